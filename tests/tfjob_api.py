"""Validate a TFJob manifest against the TFJob API, built at test time from Kubeflow's published Python models
(`kubeflow-training`, OpenAPI-generated from the operator's Go types, with the Kubernetes core models they use).

Checked, as the API server would with strict field validation (kubectl's default since Kubernetes 1.27): every field
exists in the API at its place (an unknown field is an error), every value has the field's type, and required fields
are present (the models' own client-side validation). Added by hand, because the models keep them only in prose
(training-operator `pkg/apis/kubeflow.org/v1/common_types.go`, `tensorflow_types.go`, `tensorflow_validation.go`):
restartPolicy's and cleanPodPolicy's values, the TF replica types, and the operator's webhook rules (a DNS-1035 job
name, one container named "tensorflow" with an image in every replica, at most one chief).
"""
import re
from typing import Any, List

from kubeflow.training import models as kubeflow_models
from kubernetes.client import models as core_models

RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
CLEAN_POD_POLICIES = ("All", "Running", "None")
TF_REPLICA_TYPES = ("Chief", "Master", "PS", "Worker", "Evaluator")
_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_PRIMITIVES = {"str": str, "int": int, "float": (int, float), "bool": bool}


def _model(name: str):
    return getattr(kubeflow_models, name, None) or getattr(core_models, name)


def _check(value: Any, type_name: str, path: str, errors: List[str]):
    if type_name.startswith("list["):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__}")
            return
        for i, item in enumerate(value):
            _check(item, type_name[5:-1], f"{path}[{i}]", errors)
    elif type_name.startswith("dict("):
        value_type = type_name[5:-1].split(", ", 1)[1]
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a map, got {type(value).__name__}")
            return
        for key, item in value.items():
            _check(item, value_type, f"{path}.{key}", errors)
    elif type_name in _PRIMITIVES:
        kind = _PRIMITIVES[type_name]
        if not isinstance(value, kind) or (type_name != "bool" and isinstance(value, bool)):
            errors.append(f"{path}: expected {type_name}, got {value!r}")
    elif type_name == "object":
        pass
    else:
        cls = _model(type_name)
        if not isinstance(value, dict):
            errors.append(f"{path}: expected a {type_name} object, got {type(value).__name__}")
            return
        by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
        for key, item in value.items():
            if key not in by_json:
                errors.append(f"{path}.{key}: unknown field of {type_name}")
            else:
                _check(item, cls.openapi_types[by_json[key]], f"{path}.{key}", errors)
        try:  # required fields and the models' own value checks
            cls(**{by_json[k]: v for k, v in value.items() if k in by_json})
        except ValueError as e:
            errors.append(f"{path}: {e}")


def validate_tfjob(doc: dict) -> List[str]:
    """Every way `doc` is not a valid TFJob (an empty list when it is)."""
    errors: List[str] = []
    _check(doc, "KubeflowOrgV1TFJob", "TFJob", errors)
    if doc.get("apiVersion") != "kubeflow.org/v1" or doc.get("kind") != "TFJob":
        errors.append("TFJob: apiVersion/kind must be kubeflow.org/v1 TFJob")
    name = (doc.get("metadata") or {}).get("name", "")
    if not _DNS_1035.match(name) or len(name) > 63:
        errors.append(f"metadata.name {name!r} is not a DNS-1035 label")
    specs = (doc.get("spec") or {}).get("tfReplicaSpecs") or {}
    if not specs:
        errors.append("spec.tfReplicaSpecs is empty")
    chiefs = 0
    for replica_type, spec in specs.items():
        where = f"spec.tfReplicaSpecs.{replica_type}"
        if replica_type not in TF_REPLICA_TYPES:
            errors.append(f"{where}: unknown TF replica type (one of {', '.join(TF_REPLICA_TYPES)})")
        chiefs += replica_type in ("Chief", "Master")
        if spec.get("restartPolicy", "Never") not in RESTART_POLICIES:
            errors.append(f"{where}.restartPolicy {spec['restartPolicy']!r} is not one of {RESTART_POLICIES}")
        containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
        if not any(c.get("name") == "tensorflow" for c in containers):
            errors.append(f"{where}: no container named 'tensorflow'")
        if not all(c.get("image") for c in containers):
            errors.append(f"{where}: a container has no image")
    clean = ((doc.get("spec") or {}).get("runPolicy") or {}).get("cleanPodPolicy", "None")
    if clean not in CLEAN_POD_POLICIES:
        errors.append(f"spec.runPolicy.cleanPodPolicy {clean!r} is not one of {CLEAN_POD_POLICIES}")
    if chiefs > 1:
        errors.append("spec.tfReplicaSpecs: more than one Chief/Master")
    return errors
