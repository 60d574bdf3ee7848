"""The studio end to end in headless Chromium: the whole flow of a person, on the demo's sample photos.

Memorize 3 exemplars into a new memory, colorize 2 gray photos (results shown at their resolution),
a second memory colours them differently and switching back restores the first colours exactly, a
removed exemplar frees its slot on the server, and a file that is not an image shows an error. The
studio runs as a real process (its embedded memory server too) on a tiny checkpoint (studiohelpers).
"""

from __future__ import annotations

import io
import json
import urllib.request

import numpy as np
import pytest
from PIL import Image
from studiohelpers import make_checkpoint

from studio.browser import browser_missing, chrome
from studio.launcher import StudioProcess

pytestmark = [pytest.mark.integration, pytest.mark.browser]
WAIT_S = 120  # generous: a loaded 2-core machine


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The demo's photos (they ship in scikit-image): 3 + 2 colour exemplars, 2 held-out photos made gray."""
    from launch.demo import HELD_OUT, skimage_photos

    found = skimage_photos()
    folder = tmp_path_factory.mktemp("photos")
    gray = []
    for name in HELD_OUT:
        path = folder / f"gray_{name.rsplit('.', 1)[0]}.png"
        Image.open(found[name]).convert("L").save(path)
        gray.append(path)
    first = [found[n] for n in ("astronaut.png", "rocket.jpg", "hubble_deep_field.jpg")]
    second = [found[n] for n in ("retina.jpg", "ihc.png")]
    bad = folder / "notes.txt"
    bad.write_text("not an image\n")
    return {"first": first, "second": second, "gray": gray, "bad": bad}


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    why = browser_missing()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("chrome")
    drv = chrome(root / "profile", root / "chromedriver.log")
    drv.set_page_load_timeout(WAIT_S)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    ckpt = make_checkpoint(root / "run")
    proc = StudioProcess("--checkpoint", str(ckpt), "--capacity", "64", log=root / "studio.log")
    yield proc
    assert proc.stop() == 0, proc.stderr()[-3000:]


def _until(driver, condition, what: str):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d))
    except TimeoutException:
        errors = [e.text for e in driver.find_elements("css selector", "[data-testid=error]")]
        raise AssertionError(f"timed out waiting for {what}; errors on the page: {errors}") from None


def _results(driver, memory: str) -> list:
    """The result images colorized with `memory`, once all of them have loaded."""
    imgs = driver.find_elements("css selector", f"img[data-testid=result][data-memory='{memory}']")
    done = all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
               for i in imgs)
    return imgs if done else []


def _png(url: str) -> np.ndarray:
    with urllib.request.urlopen(url, timeout=60) as reply:
        assert reply.headers["Content-Type"] == "image/png"
        return np.asarray(Image.open(io.BytesIO(reply.read())).convert("RGB"))


def _colours(driver, memory: str) -> dict[str, np.ndarray]:
    """{photo id: the result PNG's pixels} of every photo colorized with `memory` (waits for all)."""
    imgs = _until(driver, lambda d: len(_results(d, memory)) == 2 and _results(d, memory), f"2 results ({memory})")
    photo_of = "return arguments[0].closest('[data-testid=result-row]').dataset.photo"
    return {driver.execute_script(photo_of, i): _png(i.get_attribute("src")) for i in imgs}


def _memorize(driver, name: str, files) -> None:
    driver.find_element("css selector", "[data-testid=new-memory]").send_keys(name)
    driver.find_element("css selector", "[data-testid=create-memory]").click()
    _until(driver, lambda d: d.find_element("css selector", "[data-testid=memory]").get_attribute("value") == name,
           f"memory {name} to be created and chosen")
    driver.find_element("css selector", "[data-testid=exemplars]").send_keys("\n".join(str(f) for f in files))
    _until(driver, lambda d: len(d.find_elements("css selector", "[data-testid=slot]")) == len(files),
           f"{len(files)} exemplar tiles in {name}")


def test_studio_flow_in_chromium(driver, studio, photos):
    base = studio.url
    driver.get(base)
    _until(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1", "the page")
    assert driver.find_elements("css selector", "[data-testid=error]") == []
    # Every asset is served by the studio itself (no CDN): scripts, styles and images are same-origin.
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert urls and all(u.startswith(base) for u in urls), urls

    # 1. A new memory with 3 exemplars: one thumbnail per written slot.
    _memorize(driver, "flowers", photos["first"])
    loaded = "return Array.from(document.querySelectorAll('[data-testid=slot] img')).filter(i => i.naturalWidth > 0).length"
    _until(driver, lambda d: d.execute_script(loaded) == 3, "3 exemplar thumbnails")
    memories = json.load(urllib.request.urlopen(base + "api/memories", timeout=60))["memories"]
    assert {m["name"]: m["written"] for m in memories}["flowers"] == 3

    # 2. Two gray photos, colorized at their own resolution, with the exemplar that answered.
    driver.find_element("css selector", "[data-testid=photos]").send_keys("\n".join(str(p) for p in photos["gray"]))
    first = _colours(driver, "flowers")
    sizes = sorted(Image.open(p).size[::-1] for p in photos["gray"])
    assert sorted(a.shape[:2] for a in first.values()) == sizes
    answers = [a.text for a in driver.find_elements("css selector", "[data-testid=answer]")]
    assert len(answers) == 2 and all("similarity" in a and "slot" in a for a in answers), answers
    progress = driver.find_element("css selector", "[data-testid=progress]")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "2"
    assert all(a.std(axis=2).mean() > 1.0 for a in first.values())  # colour, not gray

    # 3. A second memory recolours the same photos differently; switching back restores the first colours.
    _memorize(driver, "minerals", photos["second"])
    second = _colours(driver, "minerals")
    assert second.keys() == first.keys()
    for pid, arr in first.items():
        assert np.abs(arr.astype(int) - second[pid].astype(int)).mean() > 1.0
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("css selector", "[data-testid=memory]")).select_by_value("flowers")
    again = _colours(driver, "flowers")
    assert again.keys() == first.keys() and all(np.array_equal(first[p], again[p]) for p in first)

    # 4. Removing an exemplar frees its slot on the server.
    driver.find_elements("css selector", "[data-testid=remove-slot]")[0].click()
    _until(driver, lambda d: len(d.find_elements("css selector", "[data-testid=slot]")) == 2, "2 tiles left")
    memories = json.load(urllib.request.urlopen(base + "api/memories", timeout=60))["memories"]
    assert {m["name"]: m["written"] for m in memories}["flowers"] == 2

    # 5. A file that is not an image: a clear message on the page.
    driver.find_element("css selector", "[data-testid=photos]").send_keys(str(photos["bad"]))
    error = _until(driver, lambda d: d.find_elements("css selector", "[data-testid=error]"), "an error message")
    assert "notes.txt is not an image" in error[0].text
