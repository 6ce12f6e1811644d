"""The viewer: a browser page for a prediction and its explanations (``viewer/server.py``)."""
