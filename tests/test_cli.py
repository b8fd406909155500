import os
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


def test_an_error_stays_one_unbroken_line_with_its_text_as_written(tmp_path):
    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 8)
    r = subprocess.run([sys.executable, "-m", "signscale", "data", "info", str(deep / "[v2]")], capture_output=True,
                       text=True, env={**os.environ, "COLUMNS": "60"})
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stdout
    assert str(deep / "[v2]") in lines[0]  # not wrapped at 60 columns, brackets not taken for markup
