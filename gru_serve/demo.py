"""`make demo`: start a server with the shipped model, stream a generation with the CLI client,
continue it on the same session, and shut the server down."""

from __future__ import annotations

import signal
import subprocess
import sys

from gru_serve.launch import ready_target

CLI = [sys.executable, "-m", "gru_serve.cli"]


def show(args: list[str]) -> None:
    print("$ gru-serve " + " ".join(f'"{a}"' if " " in a else a for a in args), flush=True)


def run(args: list[str], capture: bool = False) -> str:
    show(args)
    r = subprocess.run([*CLI, *args], check=True, text=True, stdout=subprocess.PIPE if capture else None)
    return r.stdout or ""


def main() -> int:
    serve = ["serve", "--port", "0", "--http-port", "0", "--log-level", "WARNING"]
    show(serve)
    server = subprocess.Popen([*CLI, *serve], stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        address = ready_target(line)
        if address is None:
            print("the server did not start", file=sys.stderr)
            return 1
        target = ["--target", address]
        print(line.strip(), flush=True)
        session = run(["session", "create", "-q", *target], capture=True).strip()
        print(session)
        run(["generate", "time traveller", "--session", session, "--max-tokens", "120", "-v", *target])
        run(["generate", "--session", session, "--max-tokens", "120", "-v", *target])
        run(["session", "show", session, *target])
    finally:
        print(f"stopping the server (SIGTERM to pid {server.pid})", flush=True)
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        print(f"server exited with {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
