"""passes/, plugins/ and export/ install as dsmoe.passes / dsmoe.plugins / dsmoe.export."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_subpackages():
    import dsmoe.export
    import dsmoe.passes
    import dsmoe.plugins

    assert Path(dsmoe.passes.__file__).parent == ROOT / "passes"
    assert Path(dsmoe.plugins.__file__).parent == ROOT / "plugins"
    assert Path(dsmoe.export.__file__).parent == ROOT / "export"


@pytest.mark.slow
def test_regular_wheel_has_subpackages_and_no_top_level_passes(tmp_path):
    try:
        import setuptools  # noqa: F401
    except ImportError:
        pytest.skip("setuptools not installed")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (whl,) = tmp_path.glob("dsmoe-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    for must in ("dsmoe/passes/pipeline.py", "dsmoe/export/__init__.py", "dsmoe/plugins/moe/kernels.py",
                 "dsmoe/plugins/route/kernels.py", "dsmoe/plugins/route/README.md", "dsmoe/app/cli.py",
                 "dsmoe/bench/harness.py", "dsmoe/plugins/trt/spec.py", "dsmoe/plugins/trt/dsPluginCommon.cpp",
                 "dsmoe/plugins/trt/dsPluginTypes.h", "dsmoe/plugins/route/dsRoutePlugin.cpp",
                 "dsmoe/plugins/moe/dsMoePlugin.h", "dsmoe/plugins/trt/harness.cpp", "dsmoe/export/tensorrt.py"):
        assert must in names, must
    assert not any(n.startswith(("passes/", "export/", "plugins/", "benchmarks/")) for n in names)
    # the installed layout imports: unpack and import from it alone
    target = tmp_path / "site"
    zipfile.ZipFile(whl).extractall(target)
    code = "import dsmoe.passes.pipeline, dsmoe.export, dsmoe.plugins; print(dsmoe.passes.pipeline.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target))


@pytest.mark.slow
def test_editable_build_prints_no_layout_notice(tmp_path):
    """`pip install -e .` (what the Makefile runs) goes through .ci/build_backend.py: setuptools'
    notice about the package-dir layout is dropped, and the editable wheel is still built."""
    code = f"""
import sys, warnings
sys.path.insert(0, {str(ROOT / '.ci')!r})
import build_backend
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    name = build_backend.build_editable({str(tmp_path)!r})
print(name)
print([str(w.message) for w in caught if "Editable installation" in str(w.message)])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    name, notices = r.stdout.strip().splitlines()[-2:]
    assert name.endswith(".whl") and (tmp_path / name).is_file()
    assert notices == "[]" and "careful with folders" not in r.stderr
