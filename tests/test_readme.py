"""The README's promises that a test can hold it to (the rest are held by the tests they name)."""
from __future__ import annotations

import ast
import inspect
import re
import shlex
from pathlib import Path

import pytest

import renorm
from renorm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_the_quickstart_is_the_two_commands():
    assert code_blocks("bash")[0] == ("pip install -e . && renorm demo\n"
                                      "pip install -e '.[test]' && python -m pytest -q\n")


def test_the_stated_number_of_bad_inputs_is_the_matrix_size():
    from test_bad_inputs import CASES

    stated = re.search(r"the (\d+)\s+cases of `tests/test_bad_inputs.py`", README)
    assert stated and int(stated.group(1)) == len(CASES)


def command_lines(program: str) -> list[list[str]]:
    """The README's bash lines that run `program`, split into words (continuations joined)."""
    lines = "\n".join(code_blocks("bash")).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip().startswith(program + " ")]


def test_every_command_line_in_the_readme_parses():
    parser = build_parser()
    commands = command_lines("renorm")
    assert len(commands) >= 6
    for words in commands:
        parser.parse_args(words[1:])  # a RenormError (unknown flag, bad choice) fails the test


def test_every_torchrun_line_in_the_readme_runs_a_renorm_command_that_parses():
    parser = build_parser()
    commands = command_lines("torchrun")
    assert len(commands) >= 2
    for words in commands:
        assert words[words.index("--no-python") + 1] == "renorm"
        parser.parse_args(words[words.index("--no-python") + 2:])


def test_the_python_example_calls_the_api_as_it_is():
    """Every renorm.NAME(...) in the README's Python block exists and accepts the arguments given."""
    tree = ast.parse(code_blocks("python")[0])
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "renorm"]
    assert len(calls) >= 10
    for call in calls:
        function = getattr(renorm, call.func.attr)
        inspect.signature(function).bind(*call.args, **{k.arg: k.value for k in call.keywords})


def test_every_renorm_name_in_the_prose_exists():
    """`renorm.NAME`, `renorm.module.NAME` and calls to them in backticks outside code blocks resolve."""
    import importlib

    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    names = set(re.findall(r"`(renorm(?:\.[A-Za-z_]\w*)+)", prose))
    assert len(names) >= 5, names
    for dotted in sorted(names):
        parts = dotted.split(".")
        for split in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                target = importlib.import_module(".".join(parts[:split]))
                break
            except ImportError:
                continue
        for attribute in parts[split:]:
            assert hasattr(target, attribute), f"README names {dotted}, which does not exist"
            target = getattr(target, attribute)


def test_the_how_it_works_section_keeps_one_subsection_per_stage():
    how = README[README.index("## How it works"):README.index("## Results in short")]
    assert re.findall(r"^### (.+)$", how, re.M)[:7] == ["Weights", "Bits per layer", "Reconstruction",
                                                        "Re-normalization", "Activations", "Pruning", "Report"]


@pytest.mark.parametrize("number", sorted(set(re.findall(r"\d+\.\d+", README[README.index("## Results in short"):
                                                                             README.index("## Limitations")]))))
def test_numbers_in_the_results_summary_come_from_docs_results(number):
    """Each figure in the summary is in docs/RESULTS.md (the tables the benchmarks regenerate),
    or derived from it as stated here."""
    derived = {"0.07": ("92.66", "92.59"),  # W4 pow2 resnet18 exact against FP32
               "0.35": ("89.69", "90.04")}  # the widest 256-vs-4000 gap (mobilenet_v2 W3 exact)
    results = (ROOT / "docs" / "RESULTS.md").read_text()
    if number in derived:
        a, b = derived[number]
        assert a in results and b in results and f"{abs(float(a) - float(b)):.2f}" == number
    else:
        assert number in results, number


def test_the_readme_says_exclude_means_float():
    """The old README promised depthwise layers 'at 8 bits with --exclude'; --exclude leaves a layer
    in float (test_quantize::test_excluded_layers_stay_in_float_depthwise_included)."""
    sentences = [s for s in re.split(r"(?<=[.;])\s", " ".join(README.split())) if "`--exclude" in s]
    assert sentences and all("float" in s and "8 bits" not in s for s in sentences), sentences


def test_numbers_in_the_export_section_come_from_docs_results_deploy():
    """Each figure in "### Export" is in docs/results/deploy.md, the tables benchmarks/deploy.py writes."""
    section = README[README.index("### Export"):README.index("## Results in short")]
    results = (ROOT / "docs" / "results" / "deploy.md").read_text()
    targets = {"3.0", "2.2"}  # issue 9's speed targets, quoted as targets
    numbers = [n for n in re.findall(r"\d+\.\d+", section) if n not in targets]
    assert len(numbers) >= 4
    for number in numbers:
        assert number in results, number
