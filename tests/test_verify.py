"""`make verify`: committed metrics against this run, tolerance from recorded seed noise."""

import json
import subprocess

import pytest

from fmnist_crnn import verify


def git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
                        "PATH": "/usr/bin:/bin"})


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A repository with committed metrics and three recorded baseline seeds."""
    write(tmp_path / "metrics/test.json", {"accuracy": 0.8959, "loss": 0.30, "macro_f1": 0.897})
    write(tmp_path / "metrics/train.json", {"best_val_acc": 0.902, "params_count": 555786})
    write(tmp_path / "models/environment.json", {"cpu_capability": "AVX512", "torch_threads": 2})
    for seed, acc in ((42, 0.895), (43, 0.897), (44, 0.899)):  # stdev 0.002 -> tolerance 0.006
        write(tmp_path / f"reports/study/runs/ablation/ablation-baseline-s{seed}.json",
              {"name": f"ablation-baseline-s{seed}", "variant": "baseline",
               "test_accuracy": acc, "test_loss": 0.30 + (seed - 43) * 0.01,
               "test_macro_f1": acc, "best_val_acc": acc})
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "results")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_main(capsys):
    with pytest.raises(SystemExit) as exit_info:
        verify.main([])
    return exit_info.value.code, capsys.readouterr().out


def test_an_identical_rerun_passes_as_identical(repo, capsys):
    code, out = run_main(capsys)
    assert code == 0 and "verify: PASS" in out
    assert out.count("identical") >= 5
    assert "3 standard deviations over 3 seeds" in out
    assert "Environment: the same" in out


def test_a_difference_within_seed_noise_passes_and_names_the_environment(repo, capsys):
    write(repo / "metrics/test.json", {"accuracy": 0.8999, "loss": 0.30, "macro_f1": 0.897})
    write(repo / "models/environment.json", {"cpu_capability": "AVX2", "torch_threads": 2})
    code, out = run_main(capsys)
    assert code == 0 and "verify: PASS" in out
    assert "metrics/test.json:accuracy" in out and " pass" in out
    assert "cpu_capability: committed 'AVX512', this run 'AVX2'" in out


def test_a_difference_beyond_seed_noise_fails(repo, capsys):
    write(repo / "metrics/test.json", {"accuracy": 0.8859, "loss": 0.30, "macro_f1": 0.897})
    code, out = run_main(capsys)
    assert code == 1 and "FAIL" in out


def test_another_architecture_fails_however_close_the_accuracy(repo, capsys):
    write(repo / "metrics/train.json", {"best_val_acc": 0.902, "params_count": 555787})
    code, out = run_main(capsys)
    assert code == 1


def test_too_few_seeds_is_an_error_that_says_so(repo, capsys):
    (repo / "reports/study/runs/ablation/ablation-baseline-s44.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        verify.main([])
    assert exit_info.value.code == 2
    assert "needs 3 or more recorded seeds of 'baseline'" in capsys.readouterr().err
