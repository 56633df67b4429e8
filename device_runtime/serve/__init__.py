"""``km-edge serve``: one device process answering many tasks over HTTP, packs hot-swapped.

``catalog`` keeps one verified pack per task from the packs folder (the poller), ``app`` is the
Starlette API, ``metrics`` the Prometheus text format, ``openapi`` the API description and
``server`` runs it under uvicorn. Needs the ``[serve]`` extra (starlette, uvicorn,
python-multipart); nothing else in ``device_runtime`` imports this package.
"""
