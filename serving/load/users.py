"""The Locust users of the load tests: the real TorchServe endpoint, every answer checked.

Locust loads them through ``loadtest/locustfile.py``. Run through ``make loadtest``
(``loadtest/run.py``), which starts the server, or by hand:

    DVE_KEY_FILE=build/serve/key_file.json locust -f loadtest/locustfile.py \
        --host http://127.0.0.1:8080 --headless -u 4 -r 4 -t 1m

Environment:
    DVE_KEY_FILE      TorchServe's key_file.json (the inference token is read from it)
    DVE_SCENARIO      ``mix`` (default): our model, real photos of many sizes in JPEG and
                      PNG, on /predictions and /explanations, with default and non-default
                      options (JSON and multipart); ``explain``: raw photos, default
                      options; ``stock``: TorchServe's stock image_classifier;
                      ``stock-explain``: its /explanations (Captum Integrated Gradients)
    DVE_MODEL         model name (default efficientnet_lite0)
    DVE_RESULTS_FILE  if set, every request's (scenario, ms, ok, status, ...) is appended to it (JSONL)
    DVE_RETRY_503     ``1`` (default): a 503 (the model's queue is full) is sent again with
                      exponential backoff and jitter, as ``scripts/client.py`` does
                      (``serving/backoff.py``: at most 5 tries, 15 s of waiting); each
                      retried attempt is reported as ``<name> (503, retried)``, not as a
                      failure, and only a 503 after the last try fails. ``0``: no retry,
                      every 503 is a failure (``loadtest/overload.py`` measures that way,
                      so the share rejected is a first-attempt figure)
    DVE_PAUSE_AFTER_503  seconds a user waits after a 503 it does not send again, before
                      its next (new) request (default 0): a client told the server is busy
                      that does not come straight back

A response with the wrong status, shape or map size counts as a failure.
"""

from __future__ import annotations

import base64
import json
import os
import random
import time
from pathlib import Path

from locust import HttpUser, constant, events, task

from serving.backoff import NO_RETRY, RETRIED_STATUS, Backoff, retry_after_seconds
from serving.load.checks import check_ours, check_stock, check_stock_explanation
from serving.load.photos import Photo, load_mix
from serving.server import read_token

SCENARIO = os.environ.get("DVE_SCENARIO", "mix")
MODEL = os.environ.get("DVE_MODEL", "efficientnet_lite0")
PHOTOS = load_mix()
RETRY = NO_RETRY if os.environ.get("DVE_RETRY_503", "1") == "0" else Backoff()
RETRIED = " (503, retried)"
PAUSE_AFTER_503 = float(os.environ.get("DVE_PAUSE_AFTER_503", "0"))
_results = open(os.environ["DVE_RESULTS_FILE"], "a") if os.environ.get("DVE_RESULTS_FILE") else None


@events.request.add_listener
def _record(request_type, name, response_time, response_length, exception, response=None, **kwargs) -> None:
    if _results is not None:
        status = getattr(response, "status_code", 0) or 0  # 0: no answer (no connection)
        record = {
            "scenario": SCENARIO,
            "t": time.time(),
            "ms": response_time,
            "ok": exception is None,
            "bytes": response_length,
            "status": status,
        }
        if name.endswith(RETRIED):
            record["retried"] = True  # a 503 sent again: neither an answer nor a failure
        _results.write(json.dumps(record) + "\n")


@events.quitting.add_listener
def _close(environment, **kwargs) -> None:
    if _results is not None:
        _results.flush()


class ExplainUser(HttpUser):
    """A client that sends photos as fast as it gets answers (closed loop)."""

    wait_time = constant(0)

    def on_start(self) -> None:
        self.key_file = Path(os.environ["DVE_KEY_FILE"])
        self.key_mtime = None
        self.random = random.Random()

    def _token(self) -> str:
        """The inference key, read again whenever TorchServe rewrites its key file (restarts).

        While the server is stopped its key file may be gone: the last key is sent, and the
        request fails (no connection) and counts as a failure like any other.
        """
        try:
            mtime = self.key_file.stat().st_mtime
        except FileNotFoundError:
            if self.key_mtime is None:
                raise
            return self.token
        if mtime != self.key_mtime:
            self.token = read_token(self.key_file)
            self.key_mtime = mtime
        return self.token

    def _post(self, endpoint: str, photo: Photo, name: str, check, **kwargs) -> None:
        """Sends one request, again after a 503 as ``RETRY`` allows, and checks the answer."""
        extra_headers = kwargs.pop("headers", {})
        tries, waited = 0, 0.0
        while True:
            tries += 1
            wait = self._attempt(
                endpoint,
                photo,
                name,
                check,
                {"Authorization": f"Bearer {self._token()}", **extra_headers},
                tries,
                waited,
                kwargs,
            )
            if wait is None:
                return
            time.sleep(wait)  # gevent's sleep under Locust: other users keep running
            waited += wait

    def _attempt(
        self, endpoint: str, photo: Photo, name: str, check, headers: dict, tries: int, waited: float, kwargs: dict
    ) -> float | None:
        """One attempt; the seconds to wait before the next one, or None when this answer is final."""
        with self.client.post(
            f"/{endpoint}/{MODEL}", headers=headers, name=name, catch_response=True, **kwargs
        ) as response:
            if response.status_code == 0:  # no server (a fault test stopped it): back off a little
                response.failure(f"no connection: {response.error}")
                time.sleep(0.2)
                return None
            if response.status_code == RETRIED_STATUS:
                wait = RETRY.next_wait(
                    tries, waited, retry_after_seconds(response.headers.get("Retry-After")), self.random
                )
                if wait is not None:
                    response.request_meta["name"] = name + RETRIED
                    response.success()
                    return wait
                after = f" after {tries} tries" if tries > 1 else ""
                response.failure(f"HTTP 503{after}: {response.text[:200]}")
            elif response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            else:
                try:
                    check(response, photo)
                except (AssertionError, KeyError, TypeError, ValueError) as error:
                    response.failure(f"wrong answer for {photo.name}: {error!r}")
        if response.status_code == RETRIED_STATUS and PAUSE_AFTER_503:
            time.sleep(PAUSE_AFTER_503)  # after the with-block: not part of the request's time
        return None

    def _raw(self, endpoint: str, name: str, check) -> None:
        photo = self.random.choice(PHOTOS)
        self._post(endpoint, photo, name, check, data=photo.data, headers={"Content-Type": photo.content_type})

    @task
    def scenario(self) -> None:
        if SCENARIO == "mix":
            self.random.choices(self._MIX, weights=[w for w, _ in self._MIX_WEIGHTED], k=1)[0](self)
        elif SCENARIO == "explain":
            self._raw(
                "predictions",
                "predictions raw",
                lambda r, p: check_ours(r.json(), p, 5, ("dve", "targeted_dve"), "png", 224),
            )
        elif SCENARIO == "noexplain":
            self._raw(
                "predictions", "predictions raw, no maps", lambda r, p: check_ours(r.json(), p, 5, (), "png", 224)
            )
        elif SCENARIO == "stock":
            self._raw("predictions", "stock predictions", lambda r, p: check_stock(r.json()))
        elif SCENARIO == "stock-explain":
            self._raw("explanations", "stock explanations (IG)", lambda r, p: check_stock_explanation(r.json()))
        else:
            raise SystemExit(f"unknown DVE_SCENARIO {SCENARIO!r}")

    # The mix: what real clients of our endpoint send.
    def _default_predictions(self) -> None:
        self._raw(
            "predictions",
            "predictions raw",
            lambda r, p: check_ours(r.json(), p, 5, ("dve", "targeted_dve"), "png", 224),
        )

    def _default_explanations(self) -> None:
        self._raw(
            "explanations",
            "explanations raw",
            lambda r, p: check_ours(r.json(), p, 5, ("dve", "targeted_dve"), "png", 224),
        )

    def _json_overlay(self) -> None:
        photo = self.random.choice(PHOTOS)
        options = {"topk": 3, "explanations": ["targeted_dve"], "format": "overlay", "map_size": 128}
        payload = {"image": base64.b64encode(photo.data).decode(), **options}
        self._post(
            "predictions",
            photo,
            "predictions json overlay",
            lambda r, p: check_ours(r.json(), p, 3, ("targeted_dve",), "overlay", 128),
            json=payload,
        )

    def _multipart_array(self) -> None:
        photo = self.random.choice(PHOTOS)
        fields = {"topk": "1", "explanations": "dve", "format": "array", "map_size": "32"}
        files = {"image": (photo.name, photo.data, photo.content_type)}
        self._post(
            "explanations",
            photo,
            "explanations multipart array",
            lambda r, p: check_ours(r.json(), p, 1, ("dve",), "array", 32),
            data=fields,
            files=files,
        )

    def _no_maps(self) -> None:
        photo = self.random.choice(PHOTOS)
        payload = {"image": base64.b64encode(photo.data).decode(), "explanations": [], "topk": 10}
        self._post(
            "predictions",
            photo,
            "predictions json no maps",
            lambda r, p: check_ours(r.json(), p, 10, (), "png", 224),
            json=payload,
        )

    def _original_size(self) -> None:
        photo = self.random.choice(PHOTOS[:6])  # original-size maps of the sub-megapixel photos
        payload = {"image": base64.b64encode(photo.data).decode(), "map_size": "original"}
        self._post(
            "predictions",
            photo,
            "predictions json original size",
            lambda r, p: check_ours(r.json(), p, 5, ("dve", "targeted_dve"), "png", "original"),
            json=payload,
        )

    _MIX_WEIGHTED = [
        (6, _default_predictions),
        (3, _default_explanations),
        (1, _json_overlay),
        (1, _multipart_array),
        (1, _no_maps),
        (1, _original_size),
    ]
    _MIX = [f for _, f in _MIX_WEIGHTED]
