"""The build report of manifest.json, flattened into string key/value pairs for Triton's
ModelConfig parameters (and for any listing that wants one line per figure)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Every key report_parameters can emit, in display order; a key is absent when the build did
#: not measure it (no labels: no accuracy; not batched: no invariance figures).
REPORT_KEYS = (
    "build_status",
    "target",
    "parity_max_abs_err",
    "parity_max_rel_err",
    "parity_top1_agreement",
    "parity_min_cosine",
    "accuracy",
    "eager_accuracy",
    "accuracy_drop_points",
    "batch_invariance",
    "batch_invariance_batch_size",
    "batch_invariance_max_abs_err",
    "batch_invariance_max_rel_err",
    "batch_invariance_top1_agreement",
    "batch_invariance_min_cosine",
    "calibration_method",
    "calibration_source",
    "calibration_rows",
    "calibration_inputs_sha256",
    "tolerance",
    "problems",
)


def _measures(prefix: str, record: Mapping[str, Any], out: dict[str, str]) -> None:
    """A comparison's figures (parity, or batch invariance) as `prefix_...` parameters: the
    errors, and the worst output's cosine, else its top-1 agreement (an embedding's argmax
    means nothing)."""
    for key in ("max_abs_err", "max_rel_err"):
        if key in record:
            out[f"{prefix}_{key}"] = _g(record[key])
    outputs = record.get("outputs") or {}
    top1, cosine = _worst(outputs, "top1_agreement"), _worst(outputs, "min_cosine")
    if cosine is not None:
        out[f"{prefix}_min_cosine"] = f"{cosine:.4f}"
    elif top1 is not None:
        out[f"{prefix}_top1_agreement"] = f"{top1:.4f}"


def _worst(outputs: Mapping[str, Any], figure: str) -> float | None:
    values = [float(o[figure]) for o in outputs.values() if isinstance(o, Mapping) and figure in o]
    return min(values) if values else None


def _g(value: float) -> str:
    return f"{value:.3g}"


def report_parameters(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The manifest's report as flat strings: parity against eager, top-1 agreement, accuracy
    against eager, cosine, batch invariance and the calibration used (keys in REPORT_KEYS).

    Figures over several outputs are the worst of them (the lowest top-1 agreement or cosine).
    `batch_invariance` is "pass", "fail" or "not checked (<reason>)"."""
    out: dict[str, str] = {}
    if not manifest:
        return out
    validation: Mapping[str, Any] = manifest.get("validation") or {}
    if "status" in manifest:
        out["build_status"] = str(manifest["status"])
    if "target" in manifest:
        out["target"] = str(manifest["target"])
    _measures("parity", validation, out)
    if "accuracy" in validation and "eager_accuracy" in validation:
        out["accuracy"] = f"{validation['accuracy']:.4f}"
        out["eager_accuracy"] = f"{validation['eager_accuracy']:.4f}"
        out["accuracy_drop_points"] = f"{100 * (validation['eager_accuracy'] - validation['accuracy']):.2f}"
    invariance = validation.get("batch_invariance")
    if isinstance(invariance, Mapping):
        if not invariance.get("checked"):
            out["batch_invariance"] = f"not checked ({invariance.get('reason', 'no reason given')})"
        else:
            out["batch_invariance"] = "pass" if invariance.get("batched_serving") else "fail"
            out["batch_invariance_batch_size"] = str(invariance.get("batch_size", ""))
            _measures("batch_invariance", invariance, out)
    calibration = manifest.get("calibration")
    if isinstance(calibration, Mapping):
        out["calibration_method"] = str(calibration.get("method", ""))
        out["calibration_source"] = str(calibration.get("source", ""))
        out["calibration_rows"] = str(calibration.get("rows", ""))
        out["calibration_inputs_sha256"] = str(calibration.get("inputs", ""))
    tolerance = validation.get("tolerance")
    if isinstance(tolerance, Mapping):
        out["tolerance"] = ",".join(f"{k}={v:g}" for k, v in sorted(tolerance.items()) if v is not None)
    if validation.get("problems"):
        out["problems"] = "; ".join(str(p) for p in validation["problems"])
    return out


def summary(params: Mapping[str, str]) -> str:
    """One line from report_parameters' keys (a manifest's, or a server's ModelConfig
    parameters): parity, accuracy against eager, batch invariance, calibration. Keys a server
    does not report are left out, and a missing invariance verdict says so."""
    parts = []
    if "parity_min_cosine" in params:
        parts.append(f"cos>={params['parity_min_cosine']}")
    elif "parity_top1_agreement" in params:
        parts.append(f"top1 {params['parity_top1_agreement']}")
    if "parity_max_abs_err" in params:
        parts.append(f"abs {params['parity_max_abs_err']}")
    if "accuracy" in params:
        parts.append(f"acc {params['accuracy']} (eager {params.get('eager_accuracy', '?')})")
    verdict = params.get("batch_invariance")
    if verdict is None:
        parts.append("batch invariance not reported")
    elif verdict in ("pass", "fail"):
        figure = params.get("batch_invariance_min_cosine")
        measure = f"cos>={figure}" if figure else f"abs {params.get('batch_invariance_max_abs_err', '?')}"
        parts.append(f"batch-invariant {verdict} at {params.get('batch_invariance_batch_size', '?')} ({measure})")
    else:
        parts.append(f"batch invariance {verdict}")
    if "calibration_method" in params:
        parts.append(
            f"calibrated {params['calibration_method']} on {params.get('calibration_rows', '?')} rows "
            f"of {params.get('calibration_source', '?')}"
        )
    return ", ".join(parts)


def server_reports(
    url: str,
    timeout: float = 10.0,
    credentials: Any = None,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """Every model a running server lists (RepositoryIndex), with its ModelConfig parameters:
    what `modelhub models --url` shows. `credentials` (grpc.ChannelCredentials) for a server
    with TLS, `metadata` (the authorization) for one with a token. Raises OSError naming the URL
    when it cannot be read."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(url, creds=credentials)
    headers = dict(metadata) if metadata else None
    try:
        reply = client.get_model_repository_index(headers=headers, as_json=True, client_timeout=timeout)
        index = reply.get("models", [])
        entries = []
        for model in index:
            name, version = model["name"], model.get("version", "")
            entry: dict[str, Any] = {
                "model": name,
                "version": version,
                "state": model.get("state", ""),
                "reason": model.get("reason", ""),
            }
            try:
                config = client.get_model_config(name, version, headers=headers, as_json=True, client_timeout=timeout)[
                    "config"
                ]
            except InferenceServerException as exc:  # an unavailable model has no config to read
                entry.update(parameters={}, max_batch_size=None, problem=exc.message())
            else:
                raw = config.get("parameters", {})
                entry["parameters"] = {k: str(v.get("string_value", "")) for k, v in raw.items()}
                entry["max_batch_size"] = int(config.get("max_batch_size", 0))
                entry["runtime"] = config.get("runtime", "")
            entry["report"] = summary(entry["parameters"]) if entry["parameters"] else ""
            entries.append(entry)
        return entries
    except InferenceServerException as exc:
        hint = ""
        if "HTTP/2" in (exc.message() or ""):  # an HTTP/1 server answered: the REST or metrics port
            hint = "; --url takes the server's gRPC address (default localhost:8001), not its HTTP port"
        raise OSError(f"cannot read the models of {url}: {exc.message()}{hint}") from None
    finally:
        client.close()
