"""bench/learning_curves.py: per-gene PCC against steps and CPU-seconds, collected from MLflow runs."""

import importlib.util
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("learning_curves", REPO / "bench" / "learning_curves.py")
learning_curves = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(learning_curves)


def test_curves_pair_each_evaluation_with_its_cpu_seconds_and_plot(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("curves")
    for name, scale in (("a", 1.0), ("b", 2.0)):
        run = client.create_run(exp, run_name=name)
        for step in range(1, 7):
            client.log_metric(run.info.run_id, "cpu_s", scale * 10 * step, step=step)
            if step % 3 == 0:  # evaluated every 3 steps, logged out of order
                client.log_metric(run.info.run_id, "val/pcc_gene", 0.1 * step / scale, step=step)
        client.set_terminated(run.info.run_id)
    curves = learning_curves.collect(uri, "curves", ["b", "a"])
    assert list(curves) == ["b", "a"]
    assert curves["a"] == [(3, 30.0, 0.1 * 3), (6, 60.0, 0.1 * 6)]
    assert [r[1] for r in curves["b"]] == [60.0, 120.0]
    out = learning_curves.plot(curves, 0.7, 0.5, tmp_path / "fig" / "curves.png", "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
