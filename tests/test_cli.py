"""The `socarrat` command line: a PNG with metadata, and one-line errors with exit code 2."""

import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from socarrat import storage
from socarrat.checkpoint import save_checkpoint
from socarrat.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("model")
    save_checkpoint(tiny_model, str(path))
    return str(path)


def test_generate_writes_png_with_parameters(tmp_path, model_dir):
    out = tmp_path / "img.png"
    assert main(["generate", "--prompt", "a red circle", "--seed", "4", "--steps", "3", "--sampler", "ddpm",
                 "--model", model_dir, "--out", str(out)]) == 0
    img = Image.open(out)
    assert img.size == (32, 32)
    assert img.text["parameters"].startswith("a red circle\nNegative prompt: \nSteps: 3, Sampler: DDPM")
    meta = json.loads(img.text["socarrat"])
    assert meta["seed"] == 4 and meta["spec"]["sampler"] == "ddpm"


def test_generate_precision_flag(tmp_path, model_dir, capsys):
    out = tmp_path / "bf16.png"
    assert main(["generate", "--prompt", "a red circle", "--steps", "2", "--precision", "bf16", "--model", model_dir,
                 "--out", str(out)]) == 0
    assert json.loads(Image.open(out).text["socarrat"])["precision"] == "bf16"
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--prompt", "a red circle", "--precision", "fp16", "--out", str(out)])
    assert exit_.value.code == 2 and "--precision: invalid choice: 'fp16'" in capsys.readouterr().err


def test_generate_warns_when_the_prompt_is_cut(tmp_path, model_dir, capsys):
    long = "a red circle " + "and a blue square " * 8  # more than the model's 24 tokens
    assert main(["generate", "--prompt", long, "--steps", "1", "--model", model_dir, "--out", str(tmp_path / "a.png")]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == (  # after the progress bar
        "warning: the prompt is longer than the model's text context; its end was not used")
    assert json.loads(Image.open(tmp_path / "a.png").text["socarrat"])["prompt_truncated"]


def test_generate_and_edit_read_and_write_object_storage(s3_bucket, tiny_token_checkpoint):
    made, edited = f"{s3_bucket}/made/a.png", f"{s3_bucket}/edited/a.png"
    assert main(["generate", "--prompt", "a red circle", "--model", tiny_token_checkpoint, "--out", made]) == 0
    assert main(["edit", "--image", made, "--start-step", "6", "--prompt", "a blue square",
                 "--model", tiny_token_checkpoint, "--out", edited]) == 0
    assert Image.open(io.BytesIO(storage.read_bytes(edited))).size == (32, 32)


@pytest.mark.parametrize("flags, message", [
    (["--prompt", ""], "prompts must not be empty"),
    (["--steps", "0"], "steps"),
    (["--guidance", "-1"], "guidance"),
    (["--guidance", "inf"], "guidance: Input should be a finite number"),
    (["--temperature", "nan", "0.5"], "temperature"),
    (["--sampler", "euler"], "sampler"),
    (["--height-px", "15"], "multiples of 2"),
    (["--model", "/no/such/dir"], "/no/such/dir"),
    (["--window", "8", "--tolerance", "0"], "--window, --tolerance: for Picard sampling only; add --picard"),
    (["--temperature", "1", "0.6"], "temperature: not read by the ddim sampler; leave it unset"),
    (["--sampler", "ddpm", "--picard", "--renoise-steps", "3"], "renoise_steps: not read by the ddpm sampler"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--out", "/proc/x.png"], "cannot write file:///proc/.write-check"),  # found before any sampling
])
def test_user_errors_exit_2_with_one_line(tmp_path, model_dir, capsys, flags, message):
    args = ["generate", "--prompt", "a red circle", "--model", model_dir, "--out", str(tmp_path / "x.png"), *flags]
    if "--model" in flags:
        args = args[:3] + args[5:]  # the flag's own --model replaces the fixture's
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_a_token_model_refuses_the_gaussian_samplers_spacing(tmp_path, tiny_token_checkpoint, capsys):
    args = ["generate", "--prompt", "a red circle", "--model", tiny_token_checkpoint, "--out", str(tmp_path / "x.png")]
    assert main([*args, "--spacing", "leading"]) == 2
    assert capsys.readouterr().err.strip().endswith("error: spacing: not read by the paella sampler; leave it unset")


@pytest.mark.parametrize("flags, message", [(["--seed", "-1"], "--seed must be >= 0, got -1"),
                                            (["--count", "0"], "--count must be >= 1, got 0")])
def test_shapes_shards_refuses_bad_flags_with_one_line(tmp_path, capsys, flags, message):
    assert main(["shapes-shards", "--out", str(tmp_path / "s"), *flags]) == 2
    assert capsys.readouterr().err.strip().endswith(message) and not (tmp_path / "s").exists()


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "socarrat.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout


def test_edit_inpaints_outpaints_and_restyles_with_a_token_model(tmp_path, tiny_token_checkpoint, capsys):
    source = tmp_path / "src.png"
    assert main(["generate", "--prompt", "a red circle", "--model", tiny_token_checkpoint, "--out", str(source)]) == 0
    assert json.loads(Image.open(source).text["socarrat"])["spec"]["sampler"] == "paella"
    mask = tmp_path / "mask.png"
    Image.new("L", (32, 32), 0).save(mask)
    mask.with_suffix(".txt").write_text("not an image")
    base = ["edit", "--image", str(source), "--prompt", "a blue square", "--model", tiny_token_checkpoint]
    assert main([*base, "--outpaint", "0", "16", "0", "0", "--out", str(tmp_path / "wide.png")]) == 0
    assert main([*base, "--start-step", "6", "--picard", "--out", str(tmp_path / "restyled.png")]) == 0
    assert Image.open(tmp_path / "wide.png").size == (48, 32) and Image.open(tmp_path / "restyled.png").size == (32, 32)
    capsys.readouterr()
    for flags, message in [(["--mask", str(mask), "--outpaint", "1", "1", "1", "1"], "not both"),
                           (["--image", str(tmp_path / "nope.png")], "nope.png does not exist"),
                           (["--image", str(mask.with_suffix(".txt"))], "is not a readable image"),
                           (["--outpaint", "0", "3", "0", "0"], "multiples of 8"),
                           (["--sampler", "ddim"], "does not apply"),
                           (["--height-px", "64"], "leave out --height-px"),
                           (["--mask", str(mask)], "mark no pixel"),  # all black: nothing to paint
                           ([], "would ignore its images")]:
        assert main([*base, *flags, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err
