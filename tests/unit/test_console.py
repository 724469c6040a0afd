"""The quiet terminal of `raybm pipeline --quiet`: headlines on the terminal, everything
else in the log, errors on the terminal in full (a subprocess: it moves file descriptors)."""

import subprocess
import sys
import textwrap


def run_quietly(tmp_path, body: str) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "logs" / "console.log"
    code = textwrap.dedent(f"""
        import os, sys, warnings
        from raybm.commands.console import QuietConsole
        from raybm.errors import RaybmError
        with QuietConsole({str(log)!r}) as console:
            console.say("stage data done")
            print("ray: started a local instance")
            os.write(2, b"C++: noise from a library\\n")
            warnings.warn("a tracer warning")
            console.log("a detail")
        {textwrap.indent(body, "    ").strip()}
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return out, log.read_text()


def test_only_headlines_reach_the_terminal_and_the_log_holds_everything(tmp_path):
    out, log = run_quietly(tmp_path, "print('after: still in the log')")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "stage data done\n" and out.stderr == ""
    for line in (
        "stage data done",
        "ray: started a local instance",
        "C++: noise from a library",
        "a tracer warning",
        "a detail",
        "after: still in the log",
    ):
        assert line in log, line


def test_errors_reach_the_terminal_in_full(tmp_path):
    log = tmp_path / "console.log"
    code = textwrap.dedent(f"""
        from raybm.commands.console import QuietConsole
        from raybm.errors import RaybmError
        with QuietConsole({str(log)!r}) as console:
            print("noise")
            raise RaybmError("the bucket does not exist")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stdout == f"error: the bucket does not exist\nThe whole output is in {log}\n"
    assert "noise" in log.read_text() and "Traceback" in log.read_text()  # Python's own report went to the log
    code = code.replace('raise RaybmError("the bucket does not exist")', "1 / 0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "Traceback" in out.stdout and "ZeroDivisionError: division by zero" in out.stdout
