import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "core"


def test_core_sources_never_import_ray():
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert offenders == []


def test_importing_all_of_core_loads_no_ray_module():
    modules = sorted(
        ".".join(p.relative_to(CORE).with_suffix("").parts)
        for p in CORE.rglob("*.py")
        if p.stem != "__init__"
    )
    code = (
        "import sys\n"
        + "".join(f"import core.{m}\n" for m in modules)
        + (
            "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\nassert not bad, bad\nprint(len(sys.modules))"
        )
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=CORE.parent)


def test_ray_init_is_forbidden_in_unit_tier():
    import pytest
    import ray

    with pytest.raises(RuntimeError, match="must not start Ray"):
        ray.init()
