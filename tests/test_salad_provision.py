"""`musetalk-flow salad provision`: each class's queue and container group, idempotently, on the fake API."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.cli import main as cli_main
from tasks.salad import SaladClient
from tasks.salad_provision import (
    ProvisionConfig,
    names_by_class,
    provision,
    queue_for_class,
    salad_names,
)
from tasks.scaling import read_targets
from tests.fake_salad import FakeSalad
from tests.servers import serve_in_thread

ROOT = Path(__file__).resolve().parent.parent
TARGETS = read_targets(ROOT / "gpu_targets.json")
ID_4090 = "ed563892-aacd-40f5-80b7-90c9be6c759b"
CONFIG = ProvisionConfig(image="ghcr.io/acme/musetalk-flow:1.0",
                         environment={"INTERNAL_API_KEY": "int-key-77", "B2_BUCKET_NAME": "outs"})


@pytest.fixture()
def salad():
    fake = FakeSalad()
    with serve_in_thread(fake.app) as (url, _, _):
        env = fake.env(url)
        with SaladClient(env["SALAD_API_KEY"], fake.org, fake.project, base_url=env["SALAD_API_BASE_URL"],
                         backoff_s=0.0) as client:
            yield fake, client, env
    fake.close()


def writes(fake: FakeSalad) -> list[tuple[str, str]]:
    return [c for c in fake.calls if c[0] != "GET"]


def test_names_are_readable_and_stable() -> None:
    assert salad_names({"id": ID_4090, "name": "RTX 4090 (24 GB)"}).queue == "musetalk-rtx-4090-24gb"
    assert salad_names({"id": "x", "name": "RTX 4070 Ti Super (16 GB)"}).container_group == \
        "musetalk-rtx-4070-ti-super-16gb"
    names = names_by_class(TARGETS + [{"id": None, "name": "NVIDIA H200", "local": True}])
    assert len(names) == 10 and len({n.queue for n in names.values()}) == 10
    assert queue_for_class(ID_4090, TARGETS) == "musetalk-rtx-4090-24gb"
    with pytest.raises(ValueError, match="unknown Salad GPU class"):
        queue_for_class("nope", TARGETS)


def test_creates_every_class_then_changes_nothing(salad) -> None:
    fake, client, _ = salad
    actions = provision(client, TARGETS, CONFIG)
    assert [a.action for a in actions] == ["create"] * 20
    assert len(fake.queues) == 10 and len(fake.groups) == 10
    group = fake.groups["musetalk-rtx-4090-24gb"]
    assert group["container"]["image"] == CONFIG.image
    assert group["container"]["resources"]["gpu_classes"] == [ID_4090]
    assert group["container"]["resources"]["shm_size"] == 8192  # 8 GB of /dev/shm
    assert group["container"]["priority"] == "batch"
    assert group["queue_connection"] == {"path": "/generate", "port": 8000, "queue_name": "musetalk-rtx-4090-24gb"}
    for probe in ("startup_probe", "readiness_probe", "liveness_probe"):
        assert group[probe]["http"]["path"] == "/hc" and group[probe]["http"]["port"] == 8000
    assert group["container"]["environment_variables"]["GPU_CLASS_NAME"] == "RTX 4090 (24 GB)"
    assert group["replicas"] == 0

    before = len(writes(fake))
    again = provision(client, TARGETS, CONFIG)
    assert {a.action for a in again} == {"unchanged"} and len(writes(fake)) == before  # idempotent


def test_a_changed_image_is_patched_and_a_foreign_queue_connection_is_an_error(salad) -> None:
    fake, client, _ = salad
    provision(client, TARGETS, CONFIG, class_ids=[ID_4090])
    newer = CONFIG.model_copy(update={"image": "ghcr.io/acme/musetalk-flow:1.1"})
    actions = provision(client, TARGETS, newer, class_ids=[ID_4090])
    assert [(a.kind, a.action, a.changes) for a in actions] == [
        ("queue", "unchanged", []), ("container_group", "update", ["container"])]
    assert fake.groups["musetalk-rtx-4090-24gb"]["container"]["image"].endswith(":1.1")
    assert ("PATCH", "/containers/musetalk-rtx-4090-24gb") in fake.calls

    fake.groups["musetalk-rtx-4090-24gb"]["queue_connection"]["path"] = "/other"
    actions = provision(client, TARGETS, newer, class_ids=[ID_4090])
    assert actions[1].action == "error" and "delete the group" in actions[1].detail


def test_dry_run_reads_but_never_writes(salad) -> None:
    fake, client, _ = salad
    actions = provision(client, TARGETS, CONFIG, dry_run=True)
    assert [a.action for a in actions] == ["create"] * 20
    assert writes(fake) == [] and fake.groups == {}
    offline = provision(None, TARGETS, CONFIG, dry_run=True)  # no credentials: plan from scratch
    assert [a.action for a in offline] == ["create"] * 20


def test_cli_provisions_and_reports(salad, monkeypatch, capsys) -> None:
    fake, _, env = salad
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("INTERNAL_API_KEY", "internal-secret-9d2")
    argv = ["salad", "provision", "--image", "img:1", "--targets", str(ROOT / "gpu_targets.json"),
            "--class", ID_4090]
    assert cli_main(argv + ["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would create container_group musetalk-rtx-4090-24gb" in out
    assert "internal-secret-9d2" not in out and '"INTERNAL_API_KEY": "***"' in out
    assert fake.groups == {}
    assert cli_main(argv) == 0
    assert "create queue musetalk-rtx-4090-24gb" in capsys.readouterr().out
    group = fake.groups["musetalk-rtx-4090-24gb"]
    assert group["container"]["environment_variables"]["INTERNAL_API_KEY"] == "internal-secret-9d2"
