"""Provision SaladCloud for every GPU class in gpu_targets.json: one job queue and one container group each.

Per class (entries with a Salad id; local entries are skipped):

* queue ``musetalk-<class slug>`` (e.g. ``musetalk-rtx-4090-24gb``);
* container group of the same name: the worker image on that GPU class, **batch** priority (the cheapest
  Salad priority; queue work tolerates an interrupted node because the queue re-runs the job), 8 GB of
  ``/dev/shm`` (torch data loaders and NVENC share memory there; Salad's default is 64 MB), a queue
  connection that makes Salad's job-queue worker POST each job to ``/generate`` on port 8000, and
  startup/readiness/liveness probes on ``/hc`` (503 until the models are warm, DESIGN §4), replicas 0 (the
  ``scale`` flow sizes it to the queue).

Idempotent: what exists is read first. A missing queue or group is created; an existing group whose image,
resources, priority, environment or probes differ from the spec is PATCHed with just those parts; one that
matches is left alone. A queue connection cannot be changed on an existing group (Salad fixes it at
creation), so a group connected elsewhere is reported as an error instead of being silently kept.

Environment variables the worker needs (orchestrator URL and key, B2) are copied from the provisioner's
environment when set; ``GPU_CLASS_NAME`` is the class name. Plans (dry runs) show secret values as ``***``.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal, Mapping, Optional

from pydantic import BaseModel, Field

from tasks.salad import SaladApiError, SaladClient
from tasks.scaling import salad_classes

QUEUE_PATH = "/generate"
WORKER_PORT = 8000
HEALTH_PATH = "/hc"
NAME_PREFIX = "musetalk-"
# Passed through from the provisioner's environment when set (DESIGN §7 names).
PASSTHROUGH_ENV = ("ORCHESTRATOR_BASE_URL", "INTERNAL_API_KEY", "B2_KEY_ID", "B2_APP_KEY", "B2_BUCKET_NAME",
                   "B2_PREFIX")
SECRET_ENV = {"INTERNAL_API_KEY", "B2_APP_KEY"}
# Parts of a container group that a merge PATCH may change after creation.
PATCHABLE = ("container", "startup_probe", "readiness_probe", "liveness_probe")


class ProvisionConfig(BaseModel):
    """What every class's container group runs with."""

    image: str = Field(min_length=1, description="worker image, e.g. ghcr.io/acme/musetalk-flow:1.2")
    cpu: int = Field(4, ge=1, le=16)
    memory_mb: int = Field(24576, ge=1024, le=61440)
    storage_gb: int = Field(50, ge=1, le=250)
    shm_mb: int = Field(8192, ge=64, description="size of /dev/shm")
    priority: Literal["high", "medium", "low", "batch"] = "batch"
    replicas: int = Field(0, ge=0, description="initial replicas; the scale flow takes over")
    startup_timeout_s: int = Field(1800, ge=60, description="how long model loading may take on a cold node")
    environment: dict[str, str] = Field(default_factory=dict)


class SaladNames(BaseModel):
    queue: str
    container_group: str


class ProvisionAction(BaseModel):
    """One step of a provisioning plan or run."""

    class_id: str
    class_name: str
    kind: Literal["queue", "container_group"]
    name: str
    action: Literal["create", "update", "unchanged", "error"]
    changes: list[str] = Field(default_factory=list)
    detail: Optional[str] = None


# -------------------------------------------------------------------------------------------- naming


def slug(class_name: str) -> str:
    """`RTX 4090 (24 GB)` → `rtx-4090-24gb` (Salad names: lower-case letters, digits, hyphens)."""
    text = class_name.lower().replace(" gb", "gb")
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def salad_names(entry: Mapping[str, Any]) -> SaladNames:
    """The queue and container group of one gpu_targets.json class (the same name for both)."""
    name = (NAME_PREFIX + slug(str(entry["name"])))[:63].rstrip("-")
    return SaladNames(queue=name, container_group=name)


def names_by_class(targets: list[Mapping[str, Any]]) -> dict[str, SaladNames]:
    """class id → its queue and container group, for routing and scaling."""
    return {str(t["id"]): salad_names(t) for t in salad_classes(targets)}


# ---------------------------------------------------------------------------------------------- specs


def worker_environment(env: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The DESIGN §7 variables the worker needs, from ``env`` (default: this process's environment)."""
    env = os.environ if env is None else env
    return {name: env[name] for name in PASSTHROUGH_ENV if env.get(name)}


def _probe(initial_delay: int, period: int, failures: int) -> dict[str, Any]:
    return {
        "http": {"path": HEALTH_PATH, "port": WORKER_PORT, "scheme": "http", "headers": []},
        "initial_delay_seconds": initial_delay,
        "period_seconds": period,
        "timeout_seconds": 10,
        "success_threshold": 1,
        "failure_threshold": failures,
    }


def queue_spec(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "name": salad_names(entry).queue,
        "display_name": f"MuseTalk {entry['name']}",
        "description": f"MuseTalk lip-sync jobs for GPU class {entry['name']} ({entry['id']})",
    }


def container_group_spec(entry: Mapping[str, Any], config: ProvisionConfig) -> dict[str, Any]:
    """The container group create body for one class."""
    names = salad_names(entry)
    environment = {**config.environment, "GPU_CLASS_NAME": str(entry["name"])}
    return {
        "name": names.container_group,
        "display_name": f"MuseTalk {entry['name']}",
        "container": {
            "image": config.image,
            "resources": {
                "cpu": config.cpu,
                "memory": config.memory_mb,
                "gpu_classes": [str(entry["id"])],
                "storage_amount": config.storage_gb * 1024 ** 3,
                "shm_size": config.shm_mb,
            },
            "priority": config.priority,
            "environment_variables": environment,
        },
        "autostart_policy": True,
        "restart_policy": "always",
        "replicas": config.replicas,
        "queue_connection": {"path": QUEUE_PATH, "port": WORKER_PORT, "queue_name": names.queue},
        # Startup: the models load once per node, slowly on a cold disk; readiness gates job delivery;
        # liveness restarts a worker whose /hc stops answering.
        "startup_probe": _probe(10, 10, max(3, config.startup_timeout_s // 10)),
        "readiness_probe": _probe(0, 5, 3),
        "liveness_probe": _probe(0, 30, 5),
    }


def redacted(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a spec with secret environment values as ``***`` (for plans and logs)."""
    out = dict(spec)
    container = dict(out.get("container") or {})
    env = dict(container.get("environment_variables") or {})
    for key in env:
        if key in SECRET_ENV:
            env[key] = "***"
    container["environment_variables"] = env
    out["container"] = container
    return out


# ------------------------------------------------------------------------------------------- compare


def _differs(want: Any, have: Any) -> bool:
    """True when ``have`` lacks or contradicts something ``want`` sets (extra server fields are fine)."""
    if isinstance(want, Mapping):
        if not isinstance(have, Mapping):
            return True
        return any(_differs(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        return not isinstance(have, list) or len(want) != len(have) or any(
            _differs(w, h) for w, h in zip(want, have))
    return want != have


def group_patch(spec: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that brings ``current`` to ``spec`` (only the parts that differ)."""
    return {key: spec[key] for key in PATCHABLE if _differs(spec[key], current.get(key))}


# ------------------------------------------------------------------------------------------ provision


def _read_or_none(read: Any, name: str) -> Optional[dict[str, Any]]:
    """What Salad has under ``name`` (``read`` is a client getter), or None when it does not exist."""
    try:
        return read(name)
    except SaladApiError as exc:
        if exc.status_code != 404:
            raise
        return None


def _provision_queue(client: Optional[SaladClient], entry: Mapping[str, Any], *, dry_run: bool) -> ProvisionAction:
    """The class's job queue: created when missing; an existing queue has nothing to update."""
    name = salad_names(entry).queue
    exists = client is not None and _read_or_none(client.get_queue, name) is not None
    if not exists and not dry_run:
        client.create_queue(**queue_spec(entry))
    return ProvisionAction(class_id=str(entry["id"]), class_name=str(entry["name"]), kind="queue", name=name,
                           action="unchanged" if exists else "create")


def _provision_group(client: Optional[SaladClient], entry: Mapping[str, Any], config: ProvisionConfig, *,
                     dry_run: bool) -> ProvisionAction:
    """The class's container group: created when missing, PATCHed where it differs from the spec; a group
    connected to another queue is an error (Salad cannot change that on an existing group)."""
    name = salad_names(entry).container_group
    spec = container_group_spec(entry, config)
    current = _read_or_none(client.get_container_group, name) if client is not None else None
    base = {"class_id": str(entry["id"]), "class_name": str(entry["name"]), "kind": "container_group", "name": name}
    if current is None:
        if not dry_run:
            client.create_container_group(spec)
        return ProvisionAction(**base, action="create")
    if _differs(spec["queue_connection"], current.get("queue_connection")):
        return ProvisionAction(**base, action="error", detail=(
            f"the group's queue connection is {current.get('queue_connection')!r}, not "
            f"{spec['queue_connection']!r}; Salad cannot change it on an existing group — delete "
            f"the group {name!r} and provision again"))
    patch = group_patch(spec, current)
    if not patch:
        return ProvisionAction(**base, action="unchanged")
    if not dry_run:
        client.update_container_group(name, patch)
    return ProvisionAction(**base, action="update", changes=sorted(patch))


def provision(
    client: Optional[SaladClient],
    targets: list[Mapping[str, Any]],
    config: ProvisionConfig,
    *,
    dry_run: bool = False,
    class_ids: Optional[list[str]] = None,
) -> list[ProvisionAction]:
    """Create or update each class's queue and container group; returns what was (or would be) done.

    ``client`` None (dry run without Salad credentials) plans as if nothing existed yet.
    """
    if client is None and not dry_run:
        raise ValueError("a Salad client is required unless dry_run")
    entries = salad_classes(targets)
    if class_ids:
        unknown = sorted(set(class_ids) - {str(e["id"]) for e in entries})
        if unknown:
            raise ValueError(f"not Salad classes of gpu_targets.json: {', '.join(unknown)}")
        entries = [e for e in entries if str(e["id"]) in class_ids]
    actions: list[ProvisionAction] = []
    for entry in entries:
        actions.append(_provision_queue(client, entry, dry_run=dry_run))
        actions.append(_provision_group(client, entry, config, dry_run=dry_run))
    return actions


def queue_for_class(class_id: str, targets: list[Mapping[str, Any]]) -> str:
    """The Salad queue of route ``salad:<class_id>``; ValueError for a class gpu_targets.json lacks."""
    names = names_by_class(targets)
    if class_id not in names:
        raise ValueError(f"unknown Salad GPU class {class_id!r}: not in gpu_targets.json")
    return names[class_id].queue
