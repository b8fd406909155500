import subprocess
import sys

import signscale


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "signscale", *args], capture_output=True, text=True)


def test_version_sources_help():
    assert signscale.__version__ in _cli("version").stdout
    out = _cli("sources").stdout
    assert all(k in out for k in ("gtsrb", "gtsrb-test", "folder", "synthetic"))
    assert "pack" in _cli("--help").stdout


def test_bad_input_gives_one_clear_line_and_exit_2(tmp_path):
    r = _cli("show", f"gtsrb:{tmp_path}/missing.zip")
    assert r.returncode == 2 and "missing.zip" in r.stdout
    r = _cli("show", "gtsbr:/x")
    assert r.returncode == 2 and "gtsrb" in r.stdout  # names the closest kind
    r = _cli("train", "--data=x", "--epocs=3")
    assert r.returncode == 2 and "epochs" in r.stdout  # unknown key names the closest valid one
