"""`gru-serve serve` as a separate process, with its metrics endpoint."""

import time
import urllib.request

from gru_serve import launch
from gru_serve.launch import free_port
from gru_serve.shipped import default_model_path


class ServerProcess(launch.Server):
    """`gru-serve serve` as a separate process (started through gru_serve.launch), with its
    metrics endpoint; its stderr in log_text()."""

    def __init__(self, *args: str) -> None:
        self.metrics_port = free_port()
        argv = launch.serve_argv(default_model_path(), "--metrics-port", str(self.metrics_port), *args)
        super().__init__(argv)
        self.start()

    def metrics(self) -> dict[str, float]:
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
            .read()
            .decode()
        )
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def wait_metric(self, name: str, predicate, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            value = self.metrics().get(name)
            if value is not None and predicate(value):
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} = {value} did not reach the condition in {timeout} s")
            time.sleep(0.05)

    def stop(self, deadline_s: float = 60.0) -> int:
        return super().stop(deadline_s)
