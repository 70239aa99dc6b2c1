"""Generate the Python gRPC stubs from proto/ into monitor/wire/.

The stubs are committed so that installing the package needs no protoc; `make proto` regenerates
them and a test regenerates into a temporary directory and fails when the committed ones are
stale. grpc_tools (a dev dependency) is imported lazily for that reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILES = ("safety_monitor/v1/monitor.proto",)
PACKAGE_DIR = Path(__file__).resolve().parent
# protoc writes absolute imports ("from . import monitor_pb2"); the stubs live
# inside our package, so the import is made relative.
_ABSOLUTE_IMPORT = "from safety_monitor.v1 import monitor_pb2"
_RELATIVE_IMPORT = "from . import monitor_pb2"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc into out_dir and return the generated files."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {PROTO_FILES}")
    stubs_dir = out_dir / "safety_monitor"
    generated = sorted(p for p in stubs_dir.rglob("*") if p.suffix in (".py", ".pyi"))
    for path in generated:
        text = path.read_text()
        if _ABSOLUTE_IMPORT in text:
            path.write_text(text.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT))
    for package in {p.parent for p in generated}:
        for parent in (package, stubs_dir):
            (parent / "__init__.py").touch()
    return generated


def main(argv: list[str] | None = None) -> int:
    """Regenerate the committed gRPC stubs from the proto (`make proto`)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR)
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
