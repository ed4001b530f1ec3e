"""server/state.py without a live server: the module layout (no import circle), API key parsing and tenant
names, cache namespaces, and the `promptstash serve` flags that reach ServerConfig and the engine."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from promptstash import cli
from promptstash.config import ServerConfig
from promptstash.errors import InvalidRequestError, PromptstashError
from promptstash.server.state import (
    APIKeyConfigError,
    cache_namespace,
    generated_tenant_name,
    parse_api_keys,
)

SERVER = Path(__file__).resolve().parents[1] / "src" / "promptstash" / "server"


# ------------------------------------------------------------------------------------------ modules


def test_route_modules_import_without_importing_app() -> None:
    code = ("import sys\n"
            "import promptstash.server.openai_api, promptstash.server.anthropic_api, promptstash.server.common\n"
            "print('promptstash.server.app' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_app_imports_the_route_modules_at_module_top_not_inside_functions() -> None:
    tree = ast.parse((SERVER / "app.py").read_text())
    local_imports = [node.lineno for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
                     for node in ast.walk(fn) if isinstance(node, ast.Import | ast.ImportFrom)]
    assert local_imports == []
    top = {alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
           and node.module == "promptstash.server" for alias in node.names}
    assert {"openai_api", "anthropic_api"} <= top


# ----------------------------------------------------------------------------------------- API keys


def test_key_listed_twice_is_refused_naming_both_places() -> None:
    with pytest.raises(APIKeyConfigError, match=r"listed twice.*first at --api-key #1") as info:
        parse_api_keys(["sk-secret-1:alpha", "sk-secret-1:beta"], ["--api-key #1", "keys.txt line 4"])
    assert "keys.txt line 4" in str(info.value)
    assert "sk-secret-1" not in str(info.value)  # the key itself is never printed in full
    with pytest.raises(APIKeyConfigError, match="listed twice"):
        parse_api_keys(["same", "same"])  # also without tenants


def test_explicit_tenant_with_the_generated_prefix_is_refused() -> None:
    generated = generated_tenant_name("k1")
    with pytest.raises(APIKeyConfigError, match="reserved for the names generated"):
        parse_api_keys(["k1", f"k2:{generated}"])  # would share k1's cache
    with pytest.raises(APIKeyConfigError, match="reserved for the names generated"):
        parse_api_keys(["k2:key-anything"])


def test_reserved_admin_tenant_and_empty_parts_are_refused() -> None:
    with pytest.raises(APIKeyConfigError, match="'admin' is reserved"):
        parse_api_keys(["k:admin"])
    with pytest.raises(APIKeyConfigError, match="empty API key"):
        parse_api_keys([":alpha"])
    with pytest.raises(APIKeyConfigError, match="empty tenant"):
        parse_api_keys(["k:"])


def test_generated_tenant_names_are_stable_across_restarts_and_reorderings() -> None:
    a = parse_api_keys(["k1", "k2:alpha", "k3"])
    b = parse_api_keys(["k3", "k0", "k1", "k2:alpha"])
    assert a["k1"] == b["k1"] and a["k3"] == b["k3"]
    assert a["k1"] == "key-" + __import__("hashlib").sha256(b"k1").hexdigest()[:12]
    assert len({a["k1"], a["k3"], a["k2"]}) == 3


def test_two_keys_may_name_the_same_tenant_for_key_rotation() -> None:
    assert parse_api_keys(["old:alpha", "new:alpha"]) == {"old": "alpha", "new": "alpha"}


def test_server_config_refuses_a_key_that_is_both_admin_and_tenant_or_metrics() -> None:
    with pytest.raises(InvalidRequestError, match="admin key"):
        ServerConfig(api_keys={"k": "alpha"}, admin_keys=("k",))
    with pytest.raises(InvalidRequestError, match="metrics key"):
        ServerConfig(admin_keys=("k",), metrics_key="k")
    with pytest.raises(InvalidRequestError, match="metrics_port"):
        ServerConfig(port=8000, metrics_port=8000)


# ----------------------------------------------------------------------------------------- namespaces


def test_tenant_plus_salt_never_equals_another_tenants_namespace() -> None:
    assert cache_namespace("a", "b") != cache_namespace("a|salt=b", None)
    assert cache_namespace("a", "b") != cache_namespace("a|salt:1:b", None)
    assert cache_namespace("a", "b") != cache_namespace("a|salt:1:b", "")
    assert cache_namespace("a:1", "b") != cache_namespace("a", "1:b")
    assert cache_namespace("a", None) == cache_namespace("a", "")  # an empty salt is no salt
    assert cache_namespace("a", None) != cache_namespace("a", "x")


# ---------------------------------------------------------------------------------------------- CLI


def test_serve_refuses_a_duplicate_key_with_error_and_exit_1(capsys, tmp_path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("# rotation\nk1:alpha\n\nk2:alpha\nk1\n")
    assert cli.main(["serve", "--api-keys-file", str(keys)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "listed twice" in err and f"{keys} line 5" in err and f"{keys} line 2" in err


def test_serve_refuses_a_tenant_name_with_the_generated_prefix(capsys) -> None:
    assert cli.main(["serve", "--api-key", "k1:key-0123456789ab"]) == 1
    assert "reserved for the names generated" in capsys.readouterr().err


def test_serve_refuses_an_unreadable_keys_file(capsys, tmp_path) -> None:
    assert cli.main(["serve", "--api-keys-file", str(tmp_path / "missing.txt")]) == 1
    assert "cannot read --api-keys-file" in capsys.readouterr().err


class _Stop(PromptstashError):
    pass


def test_serve_flags_reach_server_config_and_engine_options(monkeypatch) -> None:
    seen: dict = {}

    def from_pretrained(model=None, **options):
        seen["engine"] = options
        return object()

    def create_app(engine, config):
        seen["config"] = config
        raise _Stop("stop before serving")

    from promptstash.engine.engine import Engine
    from promptstash.server import app

    monkeypatch.setattr(Engine, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(app, "create_app", create_app)
    code = cli.main(["serve", "--api-key", "k1:alpha", "--api-key", "k2", "--admin-key", "adm", "--metrics-key", "m",
                     "--metrics-port", "9101", "--tenant-max-queued", "3", "--tenant-max-running", "2",
                     "--stream-idle-timeout", "12.5", "--no-disk-cache"])
    assert code == 1
    config: ServerConfig = seen["config"]
    assert config.api_keys == {"k1": "alpha", "k2": generated_tenant_name("k2")}
    assert config.admin_keys == ("adm",) and config.metrics_key == "m" and config.metrics_port == 9101
    assert config.tenant_max_queued == 3 and config.stream_idle_timeout_s == 12.5
    assert seen["engine"]["tenant_max_running"] == 2
