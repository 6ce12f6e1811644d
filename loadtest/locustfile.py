"""Locust load test of the real TorchServe endpoint, checking every answer.

Run through ``make loadtest`` (``loadtest/run.py``), which starts the server, or by hand:

    DVE_KEY_FILE=build/serve/key_file.json locust -f loadtest/locustfile.py \
        --host http://127.0.0.1:8080 --headless -u 4 -r 4 -t 1m

Locust loads this file by path and runs the users it finds in it: ``ExplainUser`` of
``serving/load/users.py``, whose docstring lists the environment variables (DVE_KEY_FILE,
DVE_SCENARIO, DVE_MODEL, DVE_RESULTS_FILE, DVE_RETRY_503, DVE_PAUSE_AFTER_503) and the
scenarios. A response with the wrong status, shape or map size counts as a failure.
"""

from serving.load.users import ExplainUser

__all__ = ["ExplainUser"]  # Locust runs every User class of this module's namespace
