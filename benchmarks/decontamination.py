"""Decontamination: the share of planted HumanEval solutions that codex-ml's benchmark matcher catches, by method.

The corpus is the standard library's modules. Each HumanEval problem's prompt and canonical solution is
planted three ways, each copy into its own copy of a randomly chosen module at a random line boundary (so a
planted document holds one planted item):

  verbatim      prompt + canonical solution as the benchmark has them
  reformatted   re-indented (2 spaces or tabs), blank lines removed and added, trailing whitespace, docstring
                quotes switched between triple double and triple single where that keeps the string
  renamed       the functions' parameters and local variables renamed consistently (names found with ``ast``,
                replaced at their positions, so docstrings and comments keep the old names)

Every variant still parses and compiles to the same code as the original (up to the renaming and to
whitespace inside docstrings); the script checks it. Then ``ContaminationIndex.matches`` from
``codex_ml.data.decontaminate``, with the defaults of ``data.decontaminate`` (HumanEval; word 10-grams,
threshold 0.5), runs over every planted document, and over every module as it is, where any match is a false
positive. A planted item is caught when its own task is matched: by ``exact`` (a field, whitespace collapsed,
is a substring of the document) or only by ``ngram`` (half of a field's 10-grams are in the document).

    python benchmarks/decontamination.py            # 164 problems x 3 variants, the whole standard library; seconds
    python benchmarks/decontamination.py --smoke    # 10 problems, 30 modules; checks the script works
"""

from __future__ import annotations

import argparse
import ast
import io
import random
import re
import sys
import time
import tokenize
from collections import Counter
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from codex_ml.data.decontaminate import ContaminationIndex, load_benchmarks  # noqa: E402
from codex_ml.data.safety import SafetySettings  # noqa: E402
from codex_ml.data.sources import stdlib_files  # noqa: E402

FIELDS = ("prompt", "canonical_solution")
NEW_NAMES = ["value", "item", "elem", "acc", "tmp", "cur", "part", "res", "idx", "buf", "obj", "data", "node", "key"]
_WORD = re.compile(r"\w+")
_SPACE = re.compile(r"\s+")


def same_code(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` parse to the same tree, string constants compared with whitespace collapsed."""

    def dump(text: str) -> str:
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                node.value = _SPACE.sub(" ", node.value).strip()
        return ast.dump(tree)

    try:
        return dump(a) == dump(b)
    except SyntaxError:
        return False


def switch_quotes(code: str) -> str:
    if '"""' in code and "'''" not in code:
        return code.replace('"""', "'''")
    if "'''" in code and '"""' not in code:
        return code.replace("'''", '"""')
    return code


def reindent(code: str, unit: str) -> str:
    """Statements indented by their block depth in ``unit``; other lines (inside brackets or strings) have each
    4 leading spaces become ``unit``."""
    depth, depths, line_start = 0, {}, True
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.NEWLINE:
            line_start = True
        elif line_start and tok.type not in (tokenize.NL, tokenize.COMMENT):
            depths[tok.start[0]], line_start = depth, False
    out = []
    for lineno, line in enumerate(code.splitlines(keepends=True), 1):
        n = len(line) - len(line.lstrip(" "))
        out.append((unit * depths[lineno] if lineno in depths else unit * (n // 4) + " " * (n % 4)) + line[n:])
    return "".join(out)


def respace(code: str, rng: random.Random) -> str:
    """Blank lines removed, a few added, trailing whitespace on some lines."""
    out = []
    for line in code.splitlines():
        if not line.strip():
            continue
        out.append(line + rng.choice(["", "", " ", "  ", "\t"]))
        if rng.random() < 0.15:
            out.append("")
    return "\n".join(out) + "\n"


def reformat(code: str, rng: random.Random) -> str:
    """What a formatter or a copy-paste does to ``code``; each step kept only where the code stays the same."""
    steps: list[Callable[[str], str]] = [
        switch_quotes,
        lambda c: reindent(c, rng.choice(["  ", "\t"])),
        lambda c: respace(c, rng),
    ]
    for step in steps:
        changed = step(code)
        if same_code(code, changed):
            code = changed
    return code


def rename_locals(code: str, rng: random.Random) -> str:
    """``code`` with each top-level function's parameters and local variables renamed, consistently within it.

    Names are replaced at the positions ``ast`` gives, so strings, docstrings and comments are left alone.
    Names the renaming could break are kept: globals, nonlocals, imports, nested def and class names, names
    used as keyword arguments, ``except ... as`` names, and names the module binds."""
    tree = ast.parse(code)
    taken = set(_WORD.findall(code))
    module_names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    for top in tree.body:
        if isinstance(top, (ast.Import, ast.ImportFrom)):
            module_names |= {(a.asname or a.name).split(".")[0] for a in top.names}
        elif not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            module_names |= {n.id for n in ast.walk(top) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    spans: list[tuple[int, int, int, str]] = []  # line, start byte, end byte, new name
    for fn in tree.body:
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        nodes = list(ast.walk(fn))
        names = {n.arg for n in nodes if isinstance(n, ast.arg)}
        names |= {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        keep = {n for node in nodes if isinstance(node, (ast.Global, ast.Nonlocal)) for n in node.names}
        keep |= {a.asname or a.name for node in nodes if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
        keep |= {n.name for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        keep |= {n.arg for n in nodes if isinstance(n, ast.keyword) and n.arg}
        keep |= {n.name for n in nodes if isinstance(n, ast.ExceptHandler) and n.name}
        mapping = {}
        for name in sorted(names - keep - module_names):
            new = rng.choice(NEW_NAMES)
            while new in taken:
                new += rng.choice("abcdefgh")
            taken.add(new)
            mapping[name] = new
        for node in nodes:
            if isinstance(node, ast.Name) and node.id in mapping:
                spans.append((node.lineno, node.col_offset, node.end_col_offset, mapping[node.id]))
            elif isinstance(node, ast.arg) and node.arg in mapping:
                spans.append((node.lineno, node.col_offset, node.col_offset + len(node.arg), mapping[node.arg]))
    lines = [line.encode() for line in code.splitlines(keepends=True)]
    for lineno, start, end, new in sorted(spans, reverse=True):
        lines[lineno - 1] = lines[lineno - 1][:start] + new.encode() + lines[lineno - 1][end:]
    return b"".join(lines).decode()


def renamed_same_code(original: str, renamed: str) -> bool:
    """Whether ``renamed`` is ``original`` with names swapped one for one (the same tree, identifiers aside)."""

    def shape(text: str) -> str:
        return re.sub(r"(id|arg)='\w+'", r"\1=_", ast.dump(ast.parse(text)))

    try:
        return shape(original) == shape(renamed)
    except SyntaxError:
        return False


def plant(text: str, code: str, rng: random.Random) -> str:
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    at = rng.randrange(len(lines) + 1)
    return "".join(lines[:at]) + code + "".join(lines[at:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="10 problems, 30 modules: checks the script works")
    args = parser.parse_args()
    rng = random.Random(0)
    items = load_benchmarks(["humaneval"], [])
    problems: dict[str, dict[str, str]] = {}
    for item in items:
        problems.setdefault(item.item, {})[item.field] = item.text
    settings = SafetySettings()
    index = ContaminationIndex(items, settings.decontaminate_ngram, settings.decontaminate_overlap)
    files = []
    for name, path in stdlib_files():
        try:
            files.append((name, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError:
            continue
    task_ids = list(problems)
    task_ids, files = (task_ids[:10], files[:30]) if args.smoke else (task_ids, files)
    hosts = [text for _, text in files if text.strip()]

    variants: dict[str, Callable[[str], str]] = {
        "verbatim": lambda code: code,
        "reformatted": lambda code: reformat(code, rng),
        "renamed": lambda code: rename_locals(code, rng),
    }
    planted: dict[str, list[tuple[str, str]]] = {v: [] for v in variants}  # variant -> (task id, document)
    for task in task_ids:
        original = problems[task]["prompt"] + problems[task]["canonical_solution"]
        for variant, change in variants.items():
            code = change(original)
            check = renamed_same_code if variant == "renamed" else same_code
            if not check(original, code):
                raise AssertionError(f"{variant} {task}: the variant no longer compiles to the same code")
            planted[variant].append((task, plant(rng.choice(hosts), code, rng)))

    start = time.perf_counter()
    found = {v: [(task, index.matches(doc)) for task, doc in docs] for v, docs in planted.items()}
    clean = [index.matches(text) for _, text in files]
    seconds = time.perf_counter() - start
    mb = (sum(len(doc) for docs in planted.values() for _, doc in docs) + sum(len(t) for _, t in files)) / 1e6

    print(
        f"corpus: {len(files)} stdlib modules; {len(task_ids)} HumanEval problems x {len(variants)} variants planted; "
        f"matcher: word {index.ngram}-grams, threshold {index.overlap}, {len(index.items)} of {len(items)} fields "
        f"long enough to test; {mb:.1f} MB matched at {mb / seconds:.1f} MB/s"
    )
    print("| variant | documents | exact | ngram only | caught | share |")
    print("|---|---|---|---|---|---|")
    caught_total = planted_total = 0
    field_lines = []
    for variant, results in found.items():
        exact = ngram = 0
        fields: Counter[tuple[str, str]] = Counter()
        for task, matches in results:
            own = [m for m in matches if m.item == task]
            fields.update((m.field, m.method) for m in own)
            if any(m.method == "exact" for m in own):
                exact += 1
            elif own:
                ngram += 1
        n = len(results)
        caught_total += exact + ngram
        planted_total += n
        print(f"| {variant} | {n} | {exact} | {ngram} | {exact + ngram} | {(exact + ngram) / n:.3f} |")
        in_plants = {task for task, _ in results}
        shown = [
            f"{field} {fields[field, 'exact'] + fields[field, 'ngram']} of "
            f"{sum(1 for i in index.items if i.field == field and i.item in in_plants)} "
            f"(exact {fields[field, 'exact']}, ngram {fields[field, 'ngram']})"
            for field in FIELDS
        ]
        field_lines.append(f"fields matched in {variant} plants (of those long enough to test): {', '.join(shown)}")
    flagged = [m for m in clean if m]
    exact_fp = sum(1 for m in flagged if any(c.method == "exact" for c in m))
    print(
        f"| clean stdlib (false positives) | {len(clean)} | {exact_fp} | {len(flagged) - exact_fp} | {len(flagged)} "
        f"| {len(flagged) / len(clean):.3f} |"
    )
    print("\n".join(field_lines))
    # HumanEval holds near-duplicate items (56 and 61 differ in a bracket pair), so a plant may match another too
    others = sum(1 for results in found.values() for task, matches in results if any(m.item != task for m in matches))
    print(f"planted documents that also match another HumanEval item: {others}")
    print(
        f"caught: {caught_total / planted_total:.3f} of planted items overall; "
        f"false positives: {len(flagged)} of {len(clean)} clean documents"
    )


if __name__ == "__main__":
    main()
