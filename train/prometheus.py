"""The Prometheus sink: rank 0 serves ``/metrics`` (``logging.prometheus.port``, 0 = off) from the
same row the JSONL gets (train/metrics.py ``MetricsLogger.log``).

Gauges carry no step label and only low-cardinality labels: ``run`` everywhere, plus ``layer``
(MoE imbalance) and ``kind`` (health flags); one counter, ``moeforge_attempts_total`` (restarts are
attempts - 1). Each log step replaces one snapshot that a scrape reads whole, so a scrape never
mixes two steps. docs/monitoring.md lists the metrics, the Grafana dashboard and HyperPod's scrape
settings. Needs the ``prometheus`` extra (prometheus-client).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from train.strict import RESERVED_PORTS  # 8080: HyperPod EKS's elastic agent

# metric name -> (row key, help)
GAUGES: Dict[str, Tuple[str, str]] = {
    "moeforge_step": ("step", "optimizer step of the last log line"),
    "moeforge_loss": ("loss", "training loss (nats/token), global mean"),
    "moeforge_tokens_per_second": ("tok_s", "tokens per second, all ranks"),
    "moeforge_mfu": ("mfu", "model FLOPs utilisation (fraction of the dense bf16 peak)"),
    "moeforge_spent_usd": ("spent_usd", "dollars spent by the run, all attempts"),
    "moeforge_usd_per_mtok": ("usd_per_mtok", "dollars per million tokens"),
    "moeforge_goodput_ettr": ("goodput/ettr", "effective training time ratio (productive / paid time)"),
    "moeforge_checkpoint_last_commit_age_seconds": ("checkpoint/last_commit_age_s",
                                                    "seconds since the newest checkpoint commit"),
    "moeforge_checkpoint_stall_seconds": ("ckpt/stall_s", "seconds the loop lost to the last save (its snapshot)"),
}
HELD = ("moeforge_checkpoint_stall_seconds",)  # kept from the last row that had it (PrometheusSink.log)
IMBALANCE = ("moeforge_moe_imbalance", re.compile(r"^moe/L(\d+)/imbalance$"),
             "MoE expert load imbalance (max / mean tokens per expert)")
HEALTH = ("moeforge_health_flag", re.compile(r"^health/flag/(\w+)$"), "1 while a health stop or guard is active")
ATTEMPTS = ("moeforge_attempts", "attempt", "attempts of this run so far (restarts = attempts - 1)")


def snapshot(step: int, row: Mapping[str, Any]) -> Dict[str, List[Tuple[Dict[str, str], float]]]:
    """metric name -> [(extra labels, value)] from a metrics row (None / non-numeric left out)."""
    def num(v) -> Optional[float]:
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    out: Dict[str, List[Tuple[Dict[str, str], float]]] = {}
    values = dict(row, step=step)
    for name, (key, _) in GAUGES.items():
        v = num(values.get(key))
        if v is not None:
            out[name] = [({}, v)]
    for name, pattern, label in ((IMBALANCE[0], IMBALANCE[1], "layer"), (HEALTH[0], HEALTH[1], "kind")):
        rows = [({label: m.group(1)}, num(v)) for k, v in values.items() if (m := pattern.match(k))]
        rows = [(labels, v) for labels, v in rows if v is not None]
        if rows:
            out[name] = rows
    attempt = num(values.get(ATTEMPTS[1]))
    if attempt is not None:
        out[ATTEMPTS[0]] = [({}, attempt)]
    return out


class PrometheusSink:
    """A prometheus-client collector on its own registry and HTTP server thread."""

    def __init__(self, port: int, addr: str, run: str):
        if port in RESERVED_PORTS:
            raise ValueError(f"logging.prometheus.port={port} is taken: {RESERVED_PORTS[port]}; pick another")
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError as e:
            raise RuntimeError("logging.prometheus.port is set but prometheus-client is not installed: "
                               "pip install 'moeforge[prometheus]' or set logging.prometheus.port=0") from e
        self.run = run
        self._snap: Dict[str, List[Tuple[Dict[str, str], float]]] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        try:
            self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as e:
            raise RuntimeError(f"logging.prometheus: cannot listen on {addr}:{port} ({e}); "
                               "pick a free logging.prometheus.port") from e
        self.port = self._server.server_port

    def log(self, step: int, row: Mapping[str, Any]) -> None:
        snap = snapshot(step, row)
        # ckpt/stall_s is on a row only after a save; the gauge holds the last save's figure until the
        # next one, as its help says, instead of vanishing from the scrapes between saves.
        for name in HELD:
            if name not in snap and name in self._snap:
                snap[name] = self._snap[name]
        self._snap = snap  # one assignment: a scrape sees one whole step

    def describe(self) -> Iterator:
        return iter(())

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self._snap
        helps = {name: h for name, (_, h) in GAUGES.items()}
        helps.update({IMBALANCE[0]: IMBALANCE[2], HEALTH[0]: HEALTH[2]})
        for name, rows in snap.items():
            if name == ATTEMPTS[0]:
                family = CounterMetricFamily(name, ATTEMPTS[2], labels=["run"])
                family.add_metric([self.run], rows[0][1])
                yield family
                continue
            extra = sorted(rows[0][0])
            family = GaugeMetricFamily(name, helps[name], labels=["run", *extra])
            for labels, value in rows:
                family.add_metric([self.run, *(labels[k] for k in extra)], value)
            yield family

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def open_sinks(cfg, run: str) -> list:
    """The extra sinks ``logging`` asks for (rank 0 only; MetricsLogger calls this)."""
    prom = getattr(cfg, "prometheus", None)
    return [PrometheusSink(prom.port, prom.addr, run)] if prom is not None and prom.port else []
