"""PCCNet studio: a local web page to build few-shot colour memories and colorize photos with them.

`pccnet-studio --checkpoint runs/X` (studio/cli.py) serves one hand-written page (studio/static/) and a
small JSON API (studio/app.py) over the model and memory operations of studio/service.py. Imports flow
studio -> trainer -> pccnet, memory_server.client; nothing imports studio.
"""
