"""The committed stubs under service/gen/ are exactly what `python -m tools.protogen` produces."""

from __future__ import annotations

from pathlib import Path

from tools import protogen


def _tree(root: Path) -> dict[Path, bytes]:
    return {
        path.relative_to(root): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.suffix in (".py", ".pyi") and "__pycache__" not in path.parts
    }


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    fresh = tmp_path / "gen"
    written = protogen.generate(fresh)
    assert Path("attnserve/v1/translator_pb2.py") in written
    committed = _tree(protogen.GENERATED_ROOT)
    regenerated = _tree(fresh)
    assert sorted(committed) == sorted(regenerated), "run `python -m tools.protogen`: the file sets differ"
    stale = [str(path) for path in regenerated if committed[path] != regenerated[path]]
    assert not stale, f"stubs out of date with protos/ (run `python -m tools.protogen`): {stale}"


def test_generation_is_deterministic(tmp_path: Path) -> None:
    protogen.generate(tmp_path / "first")
    protogen.generate(tmp_path / "second")
    assert _tree(tmp_path / "first") == _tree(tmp_path / "second")


def test_every_proto_is_compiled_and_imports_are_package_relative(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    (protos / "demo" / "v2").mkdir(parents=True)
    (protos / "demo" / "v2" / "base.proto").write_text(
        'syntax = "proto3";\npackage demo.v2;\nmessage Ping { string text = 1; }\n', encoding="utf-8"
    )
    (protos / "demo" / "v2" / "echo.proto").write_text(
        'syntax = "proto3";\npackage demo.v2;\nimport "demo/v2/base.proto";\n'
        "service Echo { rpc Say(Ping) returns (Ping); }\n",
        encoding="utf-8",
    )
    output = tmp_path / "out"
    written = protogen.generate(output, proto_root=protos)
    names = {path.as_posix() for path in written}
    assert {"demo/v2/base_pb2.py", "demo/v2/echo_pb2.py", "demo/v2/echo_pb2_grpc.py", "demo/v2/echo_pb2.pyi"} <= names
    assert {"__init__.py", "demo/__init__.py", "demo/v2/__init__.py"} <= names
    echo = (output / "demo/v2/echo_pb2.py").read_text(encoding="utf-8")
    grpc_stub = (output / "demo/v2/echo_pb2_grpc.py").read_text(encoding="utf-8")
    assert "from service.gen.demo.v2 import base_pb2" in echo
    assert "from service.gen.demo.v2 import base_pb2" in grpc_stub
    assert "\nfrom demo." not in echo + grpc_stub
    assert "from google.protobuf import" in echo


def test_sync_removes_stubs_of_deleted_protos(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    (protos / "demo").mkdir(parents=True)
    keep, drop = protos / "demo" / "keep.proto", protos / "demo" / "drop.proto"
    keep.write_text('syntax = "proto3";\npackage demo;\nmessage Keep {}\n', encoding="utf-8")
    drop.write_text('syntax = "proto3";\npackage demo;\nmessage Drop {}\n', encoding="utf-8")
    target = tmp_path / "gen"
    protogen.sync(target, proto_root=protos)
    assert (target / "demo" / "drop_pb2.py").exists()
    drop.unlink()
    protogen.sync(target, proto_root=protos)
    assert not (target / "demo" / "drop_pb2.py").exists()
    assert (target / "demo" / "keep_pb2.py").exists()


def test_rewrite_leaves_foreign_imports_alone() -> None:
    source = (
        "import grpc\nfrom google.protobuf import descriptor\n"
        "from attnserve.v1 import a_pb2 as x\nimport attnserve.v1.b_pb2\n"
    )
    rewritten = protogen.rewrite_imports(source, ["attnserve"])
    assert rewritten == (
        "import grpc\nfrom google.protobuf import descriptor\n"
        "from service.gen.attnserve.v1 import a_pb2 as x\nimport service.gen.attnserve.v1.b_pb2\n"
    )
