"""``ctfreid serve``: an HTTP search service over a durable gallery (coarse-to-fine search, Sec. 3.1).

- :mod:`ctfreid.serve.store`: the SQLite store, the only durable record of the gallery (WAL journal,
  ``synchronous=FULL``, ``secure_delete=ON``; erasure checkpoints the WAL so erased bytes leave both files);
- :mod:`ctfreid.serve.gallery`: the in-memory :class:`~ctfreid.search.index.CtFIndex` kept in step with it;
- :mod:`ctfreid.serve.encoder`: the model behind the image path (``load_encoder`` when available);
- :mod:`ctfreid.serve.app`: the FastAPI application (JSON API, auth, limits, the page at ``/``).

Nothing here reads a file path sent by a client; the store directory and the model come from the command line.
"""
