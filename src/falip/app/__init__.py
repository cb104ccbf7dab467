"""``falip serve``: a web page and a JSON API for FALIP on your own images.

:mod:`falip.app.service` checks requests and runs the model (no web framework needed);
:mod:`falip.app.server` is the FastAPI application (``create_app``) and ``serve``, which need the
``app`` extra (``falip.version.install_command("app")`` says how, for this install).
"""
