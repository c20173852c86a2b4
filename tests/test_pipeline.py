"""The whole tiny pipeline through the real CLI: real Ray, Ray Train, MLflow SQLite, Ray Serve, HTTP.

One pipeline run (module fixture, ~2 minutes on 2 cores) backs every test here.
"""
import json
import urllib.error
import urllib.request

import pytest
from mlflow import MlflowClient

from components.experiment_file import load_config
from components.metrics import CANDIDATE_METRICS
from pipelines.registry import CHECKSUMS_TAG
from pipelines.tracking import STAGE_TAG
from tests.helpers import FAST_OVERRIDES, TINY_EXPERIMENT, cli_command, cli_env, free_port, gptforge

pytestmark = pytest.mark.integration

STAGES = {"prepare_data", "pretrain", "finetune", "quantize", "evaluate", "promote"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny-run")
    overrides = [*FAST_OVERRIDES, f"workdir={workdir}"]
    result = gptforge("run", str(TINY_EXPERIMENT), *overrides, cwd=workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    cfg = load_config(TINY_EXPERIMENT, overrides)
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    return {"cfg": cfg, "stdout": result.stdout, "stderr": result.stderr, "client": client, "workdir": workdir}


def _runs(pipeline):
    client, cfg = pipeline["client"], pipeline["cfg"]
    experiment = client.get_experiment_by_name(cfg.name)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def test_run_prints_stages_table_champion_and_run_id(pipeline):
    out = pipeline["stdout"]
    for stage in ["==> prepare_data", "==> pretrain", "==> finetune", "==> quantize", "==> evaluate", "==> promote"]:
        assert stage in out
    assert "step    30/30  loss" in out  # training progress reaches the terminal
    assert "candidate" in out and "val ppl" in out and "int8_dynamic" in out
    assert "<- champion" in out
    parent, _ = _runs(pipeline)
    assert f"MLflow run: {parent.info.run_id}" in out
    assert "(RayTrainWorker" not in out + pipeline["stderr"]  # no raw Ray worker log lines


def test_mlflow_run_tree(pipeline):
    parent, children = _runs(pipeline)
    assert parent.info.status == "FINISHED"
    stages = {r.data.tags[STAGE_TAG]: r for r in children}
    assert STAGES | {"candidate", "suite-pin"} == set(stages)  # the first run pins the evaluation suite
    candidates = sorted(r.data.tags["mlflow.runName"] for r in children if r.data.tags[STAGE_TAG] == "candidate")
    assert candidates == ["candidate-fp32", "candidate-int8_dynamic"]
    assert all(r.info.status == "FINISHED" for r in children)


def test_every_run_logs_config_and_parameter_counts(pipeline):
    parent, children = _runs(pipeline)
    for run in [parent, *children]:
        params = run.data.params
        assert params["pretrain.max_steps"] == "30", run.data.tags["mlflow.runName"]
        for key in ["total", "trainable", "embedding", "non_embedding", "module.wte", "module.wpe", "module.h",
                    "module.ln_f", "module.lm_head"]:
            assert f"param_count.{key}" in params, (run.data.tags["mlflow.runName"], key)
        assert int(params["param_count.embedding"]) + int(params["param_count.non_embedding"]) == int(
            params["param_count.total"])
    # The counts match the model actually trained: tiny preset, the trained vocab, block 128.
    cfg = pipeline["cfg"]
    d, v, t, layers = 128, cfg.tokenizer.vocab_size, cfg.data.block_size, 4
    per_block = 12 * d * d + 13 * d  # attn 4d^2+4d, mlp 8d^2+5d, two LayerNorms 4d
    assert int(parent.data.params["param_count.total"]) == v * d + t * d + layers * per_block + 2 * d


def test_training_metrics_per_step_and_candidate_metrics_share_names(pipeline):
    client = pipeline["client"]
    _, children = _runs(pipeline)
    pretrain = next(r for r in children if r.data.tags[STAGE_TAG] == "pretrain")
    history = client.get_metric_history(pretrain.info.run_id, "train/loss")
    assert [m.step for m in history] == [5, 10, 15, 20, 25, 30]
    assert history[-1].value < history[0].value  # it learns
    for key in ["train/lr", "train/tokens_per_s"]:
        assert key in pretrain.data.metrics
    candidates = [r for r in children if r.data.tags[STAGE_TAG] == "candidate"]
    for run in candidates:  # the same keys for every candidate: the compare view lines them up
        names = {k for k in run.data.metrics if not k.startswith("eval/task/")}
        assert names == set(CANDIDATE_METRICS), run.data.tags["mlflow.runName"]
        assert {"eval/task/gptforge_which_body/acc", "eval/task/gptforge_which_body/acc_norm"} <= set(run.data.metrics)
    sizes = {r.data.params["candidate.variant"]: r.data.metrics["model/size_bytes"] for r in candidates}
    assert sizes["int8_dynamic"] < sizes["fp32"]
    fp32 = next(r for r in candidates if r.data.tags["candidate.variant"] == "fp32")
    assert fp32.data.metrics["eval/val_ppl_delta_pct"] == 0.0 and fp32.data.tags["candidate.reference"] == "true"


def test_the_ui_opens_on_runs_and_the_candidates_are_easy_to_find(pipeline):
    client, cfg = pipeline["client"], pipeline["cfg"]
    experiment = client.get_experiment_by_name(cfg.name)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    found = client.search_runs([experiment.experiment_id], "tags.`gptforge.stage` = 'candidate'")
    assert sorted(r.data.tags["candidate.variant"] for r in found) == ["fp32", "int8_dynamic"]
    assert all(r.data.tags["candidate.status"] == "evaluated" and r.data.tags["candidate.device"] for r in found)
    parent, _ = _runs(pipeline)
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "candidates")}
    assert logged == {f"candidates/{name}" for name in ("candidates.md", "candidates.csv", "generations.md",
                                                       "quality_vs_size.png", "quality_vs_speed.png")}
    table = open(client.download_artifacts(parent.info.run_id, "candidates/candidates.md")).read()
    assert "fp32 (ref)" in table and "int8_dynamic" in table
    for line in table.splitlines():  # the printed table is the logged one; only the champion mark widens column 1
        assert "|".join(line.split("|")[2:]) in pipeline["stdout"]


def test_champion_alias_points_at_the_winner(pipeline):
    client, cfg = pipeline["client"], pipeline["cfg"]
    version = client.get_model_version_by_alias(cfg.name, "champion")
    _, children = _runs(pipeline)
    promote = next(r for r in children if r.data.tags[STAGE_TAG] == "promote")
    assert promote.data.tags["promote.version"] == str(version.version)
    winner = client.get_run(version.run_id)
    assert winner.data.tags["mlflow.runName"] == f"candidate-{promote.data.tags['promote.winner']}"
    assert version.tags["data.fingerprint"] == winner.data.tags["data.fingerprint"]
    assert len(version.tags[CHECKSUMS_TAG]) == 64  # the pin serving checks the files against
    assert version.tags[CHECKSUMS_TAG] == winner.data.tags[CHECKSUMS_TAG]


def test_the_first_run_pins_the_evaluation_suite_and_the_version_records_it(pipeline):
    client, cfg = pipeline["client"], pipeline["cfg"]
    experiment = client.get_experiment_by_name(cfg.name)
    sha = experiment.tags["gptforge.suite.sha256"]
    assert "first run of the experiment" in experiment.tags["gptforge.suite.reason"]
    assert experiment.tags["gptforge.suite.uri"].startswith(str(pipeline["workdir"] / "suites"))
    parent, children = _runs(pipeline)
    assert parent.data.tags["eval.suite_sha256"] == sha
    version = client.get_model_version_by_alias(cfg.name, "champion")
    assert version.tags["eval.suite_sha256"] == sha
    for run in (r for r in children if r.data.tags[STAGE_TAG] == "candidate"):
        assert run.data.metrics["eval/suite_bpb"] > 0 and run.data.metrics["eval/suite_completion_bpb"] > 0


def test_runs_lists_the_pipeline_run(pipeline):
    parent, _ = _runs(pipeline)
    result = gptforge("runs", str(TINY_EXPERIMENT), f"workdir={pipeline['workdir']}", cwd=pipeline["workdir"],
                      timeout=120)
    assert result.returncode == 0
    assert parent.info.run_id in result.stdout and "FINISHED" in result.stdout


def test_a_corpus_smaller_than_one_step_is_a_data_error(tmp_path):
    corpus = tmp_path / "small"
    corpus.mkdir()
    (corpus / "notes.txt").write_text("def f(x):\n    return x + 1\n" * 100)  # a few rows of 129 tokens
    result = gptforge("run", str(TINY_EXPERIMENT), f"data.source={corpus}", "data.val_fraction=0.3",
                      f"workdir={tmp_path}", cwd=tmp_path, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "data.source gives" in result.stderr and "pretrain.batch_size" in result.stderr


@pytest.fixture(scope="module")
def endpoint(pipeline):
    """The champion served by Ray Serve from the run's registry, as `gptforge serve` does."""
    from pipelines import ray_runtime, serving
    from pipelines.model_loading import RegistryLoader

    cfg = pipeline["cfg"]
    serve_cfg = type(cfg.serve)(port=free_port())
    ray_runtime.init_ray(cfg.ray_num_cpus)
    try:
        loader = RegistryLoader(str(pipeline["client"].tracking_uri), cfg.name,
                                str(pipeline["workdir"] / "serving"))
        yield serving.deploy(loader, serve_cfg)
    finally:
        serving.shutdown()
        ray_runtime.shutdown_ray()


def _post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_http_completion_from_the_champion(endpoint, pipeline):
    status, body = _post(f"{endpoint}/v1/completions",
                         {"prompt": "def add(a, b):\n", "max_tokens": 8, "temperature": 0})
    assert status == 200
    assert body["object"] == "text_completion"
    assert body["model"].startswith(f"{pipeline['cfg'].name}:v")
    choice = body["choices"][0]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= 8 or choice["finish_reason"] == "stop"
    # Greedy decoding is deterministic.
    assert _post(f"{endpoint}/v1/completions", {"prompt": "def add(a, b):\n", "max_tokens": 8,
                                                "temperature": 0})[1]["choices"][0]["text"] == choice["text"]
    with urllib.request.urlopen(f"{endpoint}/healthz", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"


@pytest.mark.parametrize("body, fragment", [
    ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "temperature": 1e-39}, "temperature"),
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
])
def test_bad_requests_get_4xx(endpoint, body, fragment):
    status, reply = _post(f"{endpoint}/v1/completions", body)
    assert 400 <= status < 500
    assert fragment in json.dumps(reply)


def test_empty_corpus_fails_clearly_and_leaves_no_run_running(tmp_path):
    corpus = tmp_path / "empty_corpus"
    corpus.mkdir()
    result = gptforge("run", str(TINY_EXPERIMENT), f"data.source={corpus}", f"workdir={tmp_path}", cwd=tmp_path,
                      timeout=300)
    assert result.returncode == 2
    assert "no .txt/.md/.py/.jsonl/.parquet files found" in result.stderr and str(corpus) in result.stderr
    assert "Traceback" not in result.stderr
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny")
    statuses = {r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert statuses == {"FAILED"}


# Slow (minutes on 2 cores): kept out of the default suite so CI stays near 15 minutes.
@pytest.mark.slow
def test_ctrl_c_during_training_exits_130_and_marks_runs_killed(tmp_path):
    import signal
    import subprocess

    process = subprocess.Popen(
        cli_command("run", str(TINY_EXPERIMENT), *FAST_OVERRIDES, "pretrain.max_steps=2000", f"workdir={tmp_path}"),
        cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen = []
    for line in process.stdout:  # wait until training really runs
        seen.append(line)
        if "/2000  loss" in line:
            process.send_signal(signal.SIGINT)
            break
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 130, "".join(seen) + output
    assert "interrupted" in output and "Traceback" not in output
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    statuses = {r.data.tags["mlflow.runName"]: r.info.status for r in runs}
    assert statuses == {"tiny-pipeline": "KILLED", "prepare_data": "FINISHED", "pretrain": "KILLED"}
