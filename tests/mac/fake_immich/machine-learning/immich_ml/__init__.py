"""
A stand-in for Immich's ``immich_ml`` package, for imml-mac's tests.

Like the real one, ``python -m immich_ml`` starts the HTTP server as a
second process with plain ``python`` looked up on PATH (Immich starts
gunicorn that way), so it has a grandchild, and it decides its execution
providers the way ``immich_ml/sessions/ort.py`` does.
"""
