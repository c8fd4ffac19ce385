"""compose.yaml hangs together: images build from files that exist, settings are real, Envoy's names resolve.

No Docker engine runs here, so this checks what `docker compose config` and a
first `up` would trip over.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from sluice_datastore.settings import DataStoreSettings
from sluice_devstack.envoy_config import compose_layout, repo_root
from sluice_inference.settings import InferenceSettings
from sluice_queue.settings import QueueSettings
from sluice_ratelimit.settings import RateLimitSettings

ROOT = repo_root()
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]


def test_every_build_target_exists_in_its_dockerfile() -> None:
    for name, service in SERVICES.items():
        if "build" in service:
            dockerfile = (ROOT / service["build"]["dockerfile"]).read_text()
            assert re.search(rf"^FROM .* AS {service['build']['target']}$", dockerfile, re.M), name


def test_envoy_routes_to_compose_services_and_mounts_the_rendered_config() -> None:
    layout = compose_layout()
    hosts = (*layout.queue_hosts, *layout.inference_hosts, *layout.ratelimit_hosts, *layout.datastore_hosts)
    for host in (*hosts, layout.otlp):
        assert host is not None and host.address in SERVICES, host
    config, certificates = SERVICES["envoy"]["volumes"]
    assert config.startswith("./envoy/envoy.compose.yaml:")
    assert certificates == f"tls:{layout.tls_dir}:ro"


def test_every_process_has_its_identity_from_the_certificates_service() -> None:
    assert SERVICES["certificates"]["volumes"] == ["tls:/etc/sluice/tls"]
    for name in ("envoy", "queue", "ratelimit", "datastore", "inference-1", "inference-2"):
        service = SERVICES[name]
        assert "tls:/etc/sluice/tls:ro" in service["volumes"], name
        assert service["depends_on"]["certificates"] == {"condition": "service_completed_successfully"}, name
        if name == "envoy":
            continue
        identity = name.split("-")[0]
        prefix = f"SLUICE_{identity.upper()}_"
        environment = service["environment"]
        assert environment[f"{prefix}TLS_CERT"] == f"/etc/sluice/tls/{identity}.pem", name
        assert environment[f"{prefix}TLS_KEY"] == f"/etc/sluice/tls/{identity}-key.pem", name
        # Its health check calls its own port, which takes only Envoy, the operator and itself.
        assert service["healthcheck"]["test"][-2:] == ["--identity", identity], name


def test_settings_in_the_environment_are_real_settings() -> None:
    known = {
        "SLUICE_INFERENCE_": set(InferenceSettings.model_fields),
        "SLUICE_QUEUE_": set(QueueSettings.model_fields),
        "SLUICE_RATELIMIT_": set(RateLimitSettings.model_fields),
        "SLUICE_DATASTORE_": set(DataStoreSettings.model_fields),
    }
    for name, service in SERVICES.items():
        for variable in service.get("environment", {}):
            for prefix, fields in known.items():
                if variable.startswith(prefix):
                    assert variable.removeprefix(prefix).lower() in fields, f"{name}: {variable}"


def test_each_inference_replica_reserves_its_own_gpu() -> None:
    gpus = [
        tuple(device["device_ids"])
        for name, service in SERVICES.items()
        if name.startswith("inference-")
        for device in service["deploy"]["resources"]["reservations"]["devices"]
    ]
    assert len(gpus) == 2 and len(set(gpus)) == 2
