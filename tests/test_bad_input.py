"""Bad input to train.py, sample.py and evaluate.py: one line that names the problem and what to do,
exit code 2, no traceback, and nothing on disk changed."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from experiments import band, bench, texts
import evaluate as eval_script
from experiments import grid as experiments
from experiments import report
import sample
import train
from machinery.cli import main_guard
from conftest import TINY, write_tiktoken

SCRIPTS = {"train": train, "sample": sample, "eval": eval_script, "experiments": experiments,
           "report": report, "bench": bench, "texts": texts, "band": band}


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A directory with a tiny trained run (run/), broken checkpoints and bad files."""
    d = tmp_path_factory.mktemp("bad")
    train.main(TINY + ["--max_iters", "2", "--eval_interval", "2", "--out_dir", str(d / "run"),
                       "--cache_dir", str(d / "cache")])
    ckpt = (d / "run" / "ckpt.pt").read_bytes()
    for name, content in (("truncated", ckpt[:len(ckpt) // 2]), ("corrupt", b"\x00junk" * 999)):
        (d / name).mkdir()
        (d / name / "ckpt.pt").write_bytes(content)
    (d / "foreign").mkdir()
    torch.save({"weights": torch.zeros(3)}, d / "foreign" / "ckpt.pt")
    files = {"empty.txt": b"", "blank.txt": b"  \n\t\n", "latin1.txt": b"Caf\xe9 au lait. " * 99,
             "nul.txt": b"Some text. \x00 More text. " * 99, "nobreak.txt": b"no full stop " * 999,
             "tiny.txt": b"Hello world.", "short.txt": b"Hello world. " * 30,
             "notjson.jsonl": b'{"segments": [}\n' * 9,
             "nofields.jsonl": b'{"text": "a document"}\n' * 9, "prompt.txt": b"\xff\xfe",
             # under 8 bytes of training text (one byte of sequence, one of text)
             "two_lines.jsonl": b'{"segments": [{"text": "Q"}, {"sequence": "A b."}]}\n'
                                b'{"segments": [{"text": "x"}]}\n',
             # one line of 50 MB, no line break and no sentence end in it
             "long_line.txt": b"word " * 10_000_000}
    for name, content in files.items():
        (d / name).write_bytes(content)
    (d / "a_file").write_text("not a directory")
    write_tiktoken(d / "gpt2.tiktoken")  # a valid .tiktoken file that is not the bytes one
    lines = (d / "gpt2.tiktoken").read_text().splitlines(keepends=True)
    (d / "garbled.tiktoken").write_text("".join(lines) + "dGg= 300 x\n")  # line 260: 3 fields
    (d / "gaps.tiktoken").write_text("".join(lines[10:]))  # without the bytes 0 to 9
    return d


def _disk(d):
    """Every file under d but the data cache, with its size and time of last change."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))
            if p.is_file() and "cache" not in p.parts}


def _fails(script, argv, capsys):
    """Run a script as its command line would; returns its stderr, after checking the shape."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main_guard(lambda: SCRIPTS[script].main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


TRAIN = TINY + ["--out_dir", "{d}/new", "--cache_dir", "{d}/cache"]
RUN = TINY + ["--out_dir", "{d}/run", "--cache_dir", "{d}/cache", "--max_iters", "4"]

CASES = [
    # files
    ("train", TRAIN + ["--dataset", "{d}/missing.txt"], "file not found: {d}/missing.txt"),
    ("train", TRAIN + ["--dataset", "{d}/empty.txt"], "empty.txt has no text"),
    ("train", TRAIN + ["--dataset", "{d}/blank.txt"], "blank.txt has no text"),
    ("train", TRAIN + ["--dataset", "{d}/latin1.txt"], "latin1.txt is not UTF-8 text (byte 3)"),
    ("train", TRAIN + ["--dataset", "{d}/nul.txt"], "nul.txt looks binary (a NUL byte at byte 11)"),
    ("train", TRAIN + ["--dataset", "{d}/nobreak.txt"], "nobreak.txt: no sentence end"),
    ("train", TRAIN + ["--dataset", "{d}/long_line.txt"], "long_line.txt: no sentence end"),
    ("train", TRAIN + ["--dataset", "{d}/long_line.txt", "--split", "line"],
     "long_line.txt: no line break"),
    ("train", TRAIN + ["--dataset", "{d}/tiny.txt"], "the file is too small"),
    ("train", TRAIN + ["--dataset", "{d}/short.txt"], "fewer than one block"),
    ("train", TRAIN + ["--dataset", "{d}/two_lines.jsonl"], "fewer than one block"),
    ("train", TRAIN + ["--dataset", "{d}/notjson.jsonl"], "notjson.jsonl:1: expected a JSON "
                                                          "object"),
    ("train", TRAIN + ["--dataset", "{d}/nofields.jsonl"], "nofields.jsonl:1: expected a JSON "
                                                           "object with a list 'segments'"),
    # flags
    *[("train", TRAIN + [f"--{name}", value], f"--{name} must be a finite number >= 0")
      for name in ("lambda_seq", "lambda_tok") for value in ("-1", "nan", "inf")],
    ("train", TRAIN + ["--lambda_seq", "0", "--lambda_tok", "0"], "both 0: nothing to train"),
    *[("train", TRAIN + [f"--{name}", value], f"--{name} must be positive, got {value}")
      for name in ("block_size", "batch_size") for value in ("0", "-3")],
    ("train", TRAIN + ["--nsp_lr_scale", "0"], "--nsp_lr_scale must be positive, got 0.0"),
    ("train", TRAIN + ["--n_embd", "100", "--n_head", "3"], "--n_embd 100 is not divisible by "
                                                            "--n_head 3"),
    ("train", TRAIN + ["--emb_embd", "30", "--emb_head", "4"], "not divisible"),
    ("train", TRAIN + ["--dataset", "wikipedia"], "unknown dataset 'wikipedia'"),
    ("train", TRAIN + ["--negatives", "bm25"], "--negatives must be auto, corpus or lexical"),
    ("train", TRAIN + ["--first_stage", "0"], "--first_stage must be >= 1, got 0"),
    ("train", TRAIN + ["--emb_from_gen", "--emb_embd", "16"], "--emb_from_gen needs --emb_embd"),
    ("train", TRAIN + ["--tokenizer", "sentencepiece"], "unknown tokenizer 'sentencepiece'"),
    ("train", TRAIN + ["--device", "tpu"], "unknown device 'tpu'"),
    ("train", TRAIN + ["--max_iterz", "5"], "unrecognized arguments: --max_iterz 5"),
    ("train", TRAIN + ["--facts_wordings", "4"], "--facts_wordings must be 1 to 3, got 4"),
    ("train", TRAIN + ["--tokenizer", "gpt2"], "pass --gpt2_file"),  # offline, no cache
    ("train", TRAIN + ["--tokenizer", "gpt2", "--gpt2_file", "{d}/no.tiktoken"], "not found"),
    ("train", TRAIN + ["--tokenizer", "gpt2", "--gpt2_file", "{d}/garbled.tiktoken"],
     "garbled.tiktoken:260 is not a .tiktoken line"),
    ("train", TRAIN + ["--tokenizer", "gpt2", "--gpt2_file", "{d}/gaps.tiktoken"],
     "gaps.tiktoken lacks 10 of the 256 single bytes"),
    # checkpoints and out_dir
    ("train", TRAIN + ["--resume"], "no checkpoint at {d}/new/ckpt.pt: nothing to --resume"),
    *[("train", TINY + ["--out_dir", f"{{d}}/{name}", "--cache_dir", "{d}/cache", "--resume"],
       "is not a readable checkpoint") for name in ("truncated", "corrupt", "foreign")],
    ("train", RUN + ["--resume", "--facts_people", "70"], "trained on other data"),
    ("train", RUN + ["--resume", "--tokenizer", "gpt2", "--gpt2_file", "{d}/gpt2.tiktoken"],
     "another tokenizer"),
    ("train", RUN + ["--resume", "--n_embd", "64"], "another shape: resume with --n_embd 32"),
    ("train", RUN, "{d}/run/ckpt.pt already exists: pass --resume to continue it or --overwrite"),
    # a missing file is said first, not the existing checkpoint that --overwrite would remove
    ("train", RUN + ["--dataset", "{d}/missing.txt"], "file not found: {d}/missing.txt"),
    ("train", RUN + ["--resume", "--overwrite"], "contradict"),
    ("train", TINY + ["--out_dir", "{d}/a_file"], "--out_dir {d}/a_file is a file"),
    *[(script, ["--out_dir", f"{{d}}/{name}"], message) for script in ("sample", "eval")
      for name, message in (("nothing", "no checkpoint at {d}/nothing/ckpt.pt: train one first"),
                            ("truncated", "is not a readable checkpoint"),
                            ("corrupt", "is not a readable checkpoint"),
                            ("foreign", "is not a readable checkpoint"))],
    ("eval", ["--out_dir", "{d}/run", "--query_from", "{d}/nothing"], "no checkpoint at"),
    ("sample", ["--out_dir", "{d}/run", "--device", "tpu"], "unknown device 'tpu'"),
    *[(script, ["--out_dir", "{d}/run", "--index", "hnsw"],
       "--index must be one of auto, exact, faiss, first_stage")
      for script in ("sample", "eval")],
    # prompts
    ("sample", ["--out_dir", "{d}/run", "--prompt", ""], "--prompt is empty"),
    ("sample", ["--out_dir", "{d}/run", "--prompt_file", "{d}/empty.txt"], "has no text"),
    ("sample", ["--out_dir", "{d}/run", "--prompt_file", "{d}/prompt.txt"], "not UTF-8 text"),
    ("sample", ["--out_dir", "{d}/run", "--prompt_file", "{d}/missing.txt"], "file not found"),
    # the experiment grid, its report, the benchmark
    ("experiments", ["--datasets", "foo"], "--datasets, --train_args: unknown dataset 'foo'"),
    ("experiments", ["--lambdas", "1,2"], "must include 0.5: the primary comparison uses it"),
    *[("experiments", ["--lambdas", v], "lambda_seq > 0") for v in ("-1", "0", "nan")],
    ("experiments", ["--lambdas", "1,x"], "comma-separated numbers"),
    ("experiments", ["--seeds", "0"], "must be positive"),
    ("experiments", ["--train_args", "--n_embd 30"], "--n_embd 30 is not divisible"),
    ("experiments", ["--train_args", "--seed 3"], "the grid sets --seed itself"),
    ("experiments", ["--train_args", "--bogus 1"], "unrecognized arguments"),
    ("experiments", ["--results", "{d}/a_file"], "{d}/a_file is a file"),
    ("report", ["--results", "{d}/nothing"], "no runs in {d}/nothing/runs.jsonl"),
    ("bench", ["--repeats", "0"], "--repeats must be positive"),
    ("bench", ["--device", "tpu"], "unknown device 'tpu'"),
    ("bench", ["--parts", "search,speed"], "--parts takes all or some of ntp_step"),
    ("texts", ["--numbered", "-1"], "--numbered takes a size in MB, 0 or more"),
    ("band", ["--seeds", "1,x"], "--seeds takes comma-separated whole numbers"),
    ("band", ["--threads", "0"], "--threads must be positive"),
]


@pytest.mark.parametrize("script, argv, message", CASES,
                         ids=[f"{s}:{' '.join(a[len(TINY):] if a[:len(TINY)] == TINY else a)}"
                              for s, a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(script, argv, message, place, capsys,
                                                          monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty, and offline here
    monkeypatch.delenv("COSUP_GPT2_FILE", raising=False)
    before = _disk(place)
    err = _fails(script, [a.format(d=place) for a in argv], capsys)
    assert message.format(d=place) in err
    assert _disk(place) == before


@pytest.mark.parametrize("script", ["sample", "eval"])
def test_index_faiss_without_faiss_is_one_line(script, place, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now fails
    before = _disk(place)
    err = _fails(script, ["--out_dir", str(place / "run"), "--index", "faiss"], capsys)
    assert err == "error: --index faiss needs faiss: pip install faiss-cpu\n"
    assert _disk(place) == before


def test_long_prompt_is_cropped_with_a_note(place, capsys):
    sample.main(["--out_dir", str(place / "run"), "--prompt", "Q: " + "x" * 300,
                 "--max_new_tokens", "3", "--no_retrieve"])
    assert "note: the prompt has 303 tokens; Gen sees its last 96" in capsys.readouterr().err


@pytest.mark.parametrize("datastore", ["stale", "corrupt"])
def test_stale_or_corrupt_datastore_is_rebuilt_with_a_note(place, tmp_path, capsys, datastore):
    run = tmp_path / "run"
    shutil.copytree(place / "run", run)
    if datastore == "stale":  # built by another Emb_seq: the run's own, before training
        sample.main(["--out_dir", str(run), "--max_new_tokens", "1"])
        ckpt = torch.load(run / "ckpt.pt", weights_only=False)
        ckpt["embedder"] = {k: v + 1e-3 for k, v in ckpt["embedder"].items()}
        torch.save(ckpt, run / "ckpt.pt")
    else:
        (run / "datastore.pt").write_bytes(b"not a datastore")
    capsys.readouterr()
    eval_script.main(["--out_dir", str(run), "--questions", "0"])
    assert f"{run / 'datastore.pt'} is stale or unreadable" in capsys.readouterr().err
    eval_script.main(["--out_dir", str(run), "--questions", "0"])  # and then it is used
    err = capsys.readouterr().err
    assert "stale or unreadable" not in err and "building the datastore" not in err


def test_training_hands_the_free_heap_back_between_evaluations(run_train, monkeypatch):
    """Without the trims, a 3 MB text's run kept 300 MB of freed heap resident by its end."""
    import train
    phases = []
    monkeypatch.setattr(train, "malloc_for", phases.append)
    monkeypatch.setattr(train, "TRIM_EVERY", 4)
    run_train("--max_iters", "10", "--eval_interval", "1000")
    # preparing; training; evaluating at 0, then training: trimmed at steps 0, 4 and 8;
    # evaluating at 10 (an evaluation may set "transient" more than once)
    merged = [p for i, p in enumerate(phases) if p == "training" or phases[i - 1:i] != [p]]
    assert merged == ["transient", "training", "transient", "training", "training", "training",
                      "training", "transient", "training"]


def test_malloc_tuning_is_skipped_where_there_is_no_glibc(monkeypatch):
    # ctypes.CDLL(None) raises TypeError on Windows: train.py must still start there
    import ctypes
    from machinery import cli

    def no_libc(name, *args, **kwargs):
        raise TypeError("expected str, bytes or os.PathLike object, not NoneType")
    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    for phase in cli.MALLOC:
        cli.malloc_for(phase)


def test_training_caps_onednns_kernel_cache_unless_the_user_set_it():
    """oneDNN keeps a compiled kernel per tensor shape, up to 1,024; a text's L_NSP candidates
    change shape every step, so by default a 3 MB text's run grew 150 MB over its steps."""
    code = "import os, train; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    for value, expected in ((None, "16"), ("64", "64")):
        if value:
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, cwd=os.path.dirname(os.path.dirname(
                                 os.path.abspath(__file__))))
        assert out.stdout.strip() == expected
