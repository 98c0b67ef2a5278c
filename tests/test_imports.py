"""`import magnet` and building the CLI parser stay light: no deepspeed, ray or mlflow."""

import subprocess
import sys

HEAVY = ("deepspeed", "ray", "mlflow")


def test_import_magnet_is_light():
    code = (
        "import sys, magnet, magnet.cli; magnet.cli.build_parser();"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported at startup: {out.stdout.strip()}"


def test_cli_version():
    out = subprocess.run([sys.executable, "-m", "magnet", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "magnet-hd" in out.stdout
