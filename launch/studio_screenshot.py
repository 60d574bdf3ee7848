"""Screenshot of the studio for the README: the demo's flow in headless Chromium, saved as a PNG.

    python launch/studio_screenshot.py --checkpoint demo/run --output docs/studio.jpg

Starts the studio on the checkpoint, creates a memory from 3 of the demo's colour photos (they ship in
scikit-image), colorizes the demo's 2 held-out photos in gray, waits for the results and saves the page
(PNG, or JPEG by the output's suffix).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

EXEMPLARS = ("astronaut.png", "rocket.jpg", "retina.jpg")
WAIT_S = 300


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="demo/run", help="checkpoint or run folder (default demo/run)")
    parser.add_argument("--output", default="docs/studio.jpg", help="PNG or JPEG to write (default docs/studio.jpg)")
    parser.add_argument("--memory-name", default="my-photos", help="name of the memory created in the page")
    args = parser.parse_args(argv)

    from PIL import Image
    from selenium.webdriver.support.ui import WebDriverWait

    from launch.demo import HELD_OUT, skimage_photos
    from studio.browser import browser_missing, chrome
    from studio.launcher import StudioProcess

    why = browser_missing()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    photos = skimage_photos()
    with tempfile.TemporaryDirectory(prefix="studio-shot-") as tmp:
        tmp = Path(tmp)
        gray = []
        for name in HELD_OUT:
            gray.append(tmp / f"{Path(name).stem}.png")
            Image.open(photos[name]).convert("L").save(gray[-1])
        studio = StudioProcess("--checkpoint", args.checkpoint, log=tmp / "studio.log")
        driver = chrome(tmp / "profile", tmp / "chromedriver.log", width=1400, height=1000)
        try:
            wait = WebDriverWait(driver, WAIT_S, poll_frequency=0.2)
            driver.get(studio.url)
            wait.until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1")
            driver.find_element("css selector", "[data-testid=new-memory]").send_keys(args.memory_name)
            driver.find_element("css selector", "[data-testid=create-memory]").click()
            wait.until(lambda d: d.find_element("css selector", "[data-testid=memory]").get_attribute("value")
                       == args.memory_name)
            driver.find_element("css selector", "[data-testid=exemplars]").send_keys(
                "\n".join(str(photos[n]) for n in EXEMPLARS))
            wait.until(lambda d: len(d.find_elements("css selector", "[data-testid=slot] img")) == len(EXEMPLARS))
            driver.find_element("css selector", "[data-testid=photos]").send_keys("\n".join(map(str, gray)))
            loaded = ("return Array.from(document.querySelectorAll('img')).every(i => i.complete && i.naturalWidth)"
                      " && document.querySelectorAll('img[data-testid=result]').length")
            wait.until(lambda d: d.execute_script(loaded) == len(gray)
                       and "colorized" in d.find_element("css selector", "[data-testid=progress-text]").text)
            out = Path(args.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(tmp / "page.png"))
            shot = Image.open(tmp / "page.png").convert("RGB")
            shot.save(out, quality=88, optimize=True) if out.suffix.lower() in (".jpg", ".jpeg") else shot.save(out)
        finally:
            driver.quit()
            studio.stop()
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
