"""Every ```bash / ```sh / ```python block of README.md and docs/*.md runs, as written or with the swap it states.

A block runs as written unless the line right above its fence is a marker:

    <!-- doc-test: needs WHAT; run with: `OLD` → `NEW`, `OLD2` → `NEW2` -->   each OLD replaced by NEW (every OLD must occur)
    <!-- doc-test: needs WHAT; not run: WHY -->                                 not run; counted and named in the summary

A fenced ```text block whose line above is ``<!-- doc-test: output -->`` is the printed output of the runnable block
just before it: the block's stdout must match it (whitespace runs are equal, ``...`` stands for anything, integers are exact and a
number with decimals matches within one unit of its last printed digit).

The blocks of one page run in order in one folder (files and the Python namespace carry over, as for a reader
going down the page). Each folder holds what the docs call "your" files, generated: ``photo.jpg`` / ``photo.png``
/ ``bird.jpg`` (a 640×480 scene of `falip synth`), ``regions.jsonl``, ``classes.txt``, ``imgs/`` and ``images/`` (a
`falip synth` set, also under ``synth/``), ``chair.ply``, ``data/`` (tiny ModelNet40 and ScanObjectNN files), a link to the
repository's src and copies of its docs, benchmarks, tools and tests (a block that writes docs/images/ or
benchmarks/results/ writes the copy).
``falip`` is a small client of one preloaded server process that forks per command, so a command costs its own
work and not the ~5 s of importing torch and open_clip again.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = ("bash", "sh", "python")
MARKER = re.compile(r"^<!--\s*doc-test:\s*(.*?)\s*-->$")
SWAP = re.compile(r"`([^`]+)`\s*→\s*`([^`]*)`")
BLOCK_TIMEOUT_S = 600


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: Optional[str]  # the marker's text after "doc-test:", or None
    output: Optional[str]  # the printed output the page shows for it, or None

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def swapped(self) -> str:
        """The code as it runs: the marker's swaps applied; an OLD that no longer occurs is an error naming the block."""
        if not self.marker or "run with:" not in self.marker:
            return self.code
        code = self.code
        pairs = SWAP.findall(self.marker.split("run with:", 1)[1])
        if not pairs:
            raise AssertionError(f"{self.where}: the doc-test marker says 'run with:' but names no `OLD` → `NEW` pair")
        for old, new in pairs:
            if old not in code:
                raise AssertionError(f"{self.where}: the doc-test swap `{old}` no longer occurs in the block; update the marker")
            code = code.replace(old, new)
        return code

    @property
    def not_run(self) -> Optional[str]:
        return self.marker.split("not run:", 1)[1].strip() if self.marker and "not run:" in self.marker else None


def blocks_of(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").split("\n")
    out: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\S*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        indent, lang = fence.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith("```"):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: a code fence is never closed")
        code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
        above = lines[i - 1].strip() if i > 0 else ""
        marker = MARKER.match(above)
        if lang in RUNNABLE:
            out.append(Block(page, i + 1, lang, code, marker.group(1) if marker else None, None))
        elif marker and marker.group(1) == "output":
            if not out or lang not in ("", "text"):
                raise AssertionError(
                    f"{page.relative_to(ROOT)}:{i + 1}: an output block must be ```text right after a runnable block"
                )
            out[-1].output = code
        elif marker:
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: a doc-test marker above a ```{lang} block, which never runs")
        i = end + 1
    return out


ALL_BLOCKS = [b for page in PAGES for b in blocks_of(page)]


# ---------------------------------------------------------------- output comparison

NUMBER = r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?"


def output_matches(expected: str, actual: str) -> Optional[str]:
    """None if ``actual`` matches the printed ``expected``, else what differs."""
    pattern, numbers = [], []
    for token in re.findall(rf"\.\.\.|{NUMBER}|\s+|[^\s\d.-]+|[.-]", expected.strip()):
        if token == "...":
            pattern.append(r".*?")
        elif re.fullmatch(NUMBER, token):
            pattern.append(f"({NUMBER})")
            numbers.append(token)
        elif token.isspace():
            pattern.append(r"\s+")
        else:
            pattern.append(re.escape(token))
    m = re.fullmatch("".join(pattern), actual.strip(), flags=re.S)
    if m is None:
        return "the text differs"
    for shown, got in zip(numbers, m.groups()):
        mantissa = shown.lower().split("e")[0]
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        exponent = int(shown.lower().split("e")[1]) if "e" in shown.lower() else 0
        unit = 10.0 ** (exponent - decimals) if "." in mantissa or "e" in shown.lower() else 0.0  # integers are exact
        if abs(float(got) - float(shown)) > unit * (1 + 1e-9):
            return f"{got} where the page shows {shown} (allowed: ±{unit:g})"
    return None


def test_output_comparison_is_robust_but_not_blind():
    shown = "box 1 ✓  23.91\n  ...\nbest: 2"
    assert output_matches(shown, "box 1 ✓    23.914\n anything here\n more\nbest: 2") is None
    assert output_matches(shown, "box 1 ✓  23.99\nx\nbest: 2") is not None  # off by more than 0.01
    assert output_matches(shown, "box 2 ✓  23.91\nx\nbest: 2") is not None
    assert output_matches("1.8e-3", "0.0018") is None and output_matches("1.8e-3", "0.0021") is not None


# ---------------------------------------------------------------- the falip command server

CLIENT = """\
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ["FALIP_DOCTEST_SOCKET"])
msg = json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
socket.send_fds(s, [len(msg).to_bytes(8, "big") + msg], [0, 1, 2])
reply = b""
while True:
    chunk = s.recv(64)
    if not chunk:
        break
    reply += chunk
sys.exit(int(reply or b"1"))
"""


# A block never installs anything: ``pip install`` runs only as ``--dry-run`` (its marker states that swap).
PIP_GUARD = """#!/bin/sh
case " $* " in *" install "*) case " $* " in *" --dry-run "*) ;; *)
  echo "doc-test: refusing 'pip $*': a doc block may run pip install only with --dry-run (state the swap in its marker)" >&2
  exit 3;; esac;; esac
exec {python} -m pip "$@"
"""


def serve(path: str) -> None:
    """Import falip's command line once, then fork one child per ``falip`` command (see ``CLIENT``)."""
    import falip.cli
    import falip.runtimes  # noqa: F401 — open_clip and torch are imported here, once

    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(16)
    while True:
        conn, _ = server.accept()
        data, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        while len(data) < 8 or len(data) < 8 + int.from_bytes(data[:8], "big"):
            data += conn.recv(1 << 20)
        request = json.loads(data[8:])
        if os.fork() == 0:
            server.close()
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            try:
                code = falip.cli.main(request["argv"])
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(str(code or 0).encode())
            os._exit(0)
        conn.close()
        for fd in fds:
            os.close(fd)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass


# ---------------------------------------------------------------- the folder the blocks run in


@pytest.fixture(scope="session")
def doc_env(tmp_path_factory):
    """Environment and data shared by every page: the ``falip`` client on PATH, generated inputs."""
    from PIL import Image

    from falip.synthetic import write_all

    base = tmp_path_factory.mktemp("docs")
    shared = base / "shared"
    write_all(shared / "synth", seed=0, n_images=6)
    scene = sorted((shared / "synth" / "images").iterdir())[0]
    photo = Image.open(scene).convert("RGB").resize((640, 480), Image.BICUBIC)
    photo.save(shared / "photo.jpg", quality=95)
    photo.save(shared / "photo.png")
    rng = np.random.default_rng(0)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_pointcloud import box_surface, make_modelnet, write_h5

    make_modelnet(shared / "data", rng, n_per_file=(3,), points=256)
    for folder, suffix in (("main_split", ""), ("main_split_nobg", ""), ("main_split", "_augmentedrot_scale75")):
        write_h5(
            shared / "data" / "h5_files" / folder / f"test_objectdataset{suffix}.h5",
            rng.normal(size=(2, 256, 3)).astype(np.float32),
            np.arange(2) % 15,
        )
    chair = box_surface(rng, (-0.5, 0, -0.5), (0.5, 0.1, 0.5), 512)
    ply = ["ply", "format ascii 1.0", f"element vertex {len(chair)}", *(f"property float {a}" for a in "xyz"), "end_header"]
    (shared / "chair.ply").write_text("\n".join(ply + [" ".join(f"{v:.5f}" for v in p) for p in chair]) + "\n")

    bin_dir = base / "bin"
    bin_dir.mkdir()
    (bin_dir / "falip").write_text(f"#!{sys.executable}\n{CLIENT}")
    (bin_dir / "falip").chmod(0o755)
    for name in ("python", "python3"):
        (bin_dir / name).symlink_to(sys.executable)
    (bin_dir / "pip").write_text(PIP_GUARD.format(python=sys.executable))
    (bin_dir / "pip").chmod(0o755)

    sock = str(base / "falip.sock")
    env = dict(os.environ)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT / "src"),
        HF_HUB_OFFLINE="1",
        FALIP_DOCTEST_SOCKET=sock,
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
        MPLBACKEND="Agg",
    )
    server = subprocess.Popen([sys.executable, __file__, "--serve", sock], env=env, cwd=base)
    deadline = time.monotonic() + 300
    while not os.path.exists(sock):
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the falip command server did not start (exit code {server.poll()})")
        time.sleep(0.1)
    yield {"shared": shared, "base": base, "env": env}
    server.kill()
    server.wait()


PAGE_DIRS: dict[Path, Path] = {}
PAGE_NAMESPACES: dict[Path, dict] = {}


def page_dir(page: Path, doc_env) -> Path:
    """The folder a page's blocks run in, made on its first block."""
    if page not in PAGE_DIRS:
        work = doc_env["base"] / page.stem
        work.mkdir()
        shared = doc_env["shared"]
        for name in ("photo.jpg", "photo.png", "chair.ply"):
            shutil.copy(shared / name, work / name)
        shutil.copy(shared / "photo.jpg", work / "bird.jpg")
        shutil.copytree(shared / "synth", work / "synth")
        shutil.copytree(shared / "data", work / "data")
        for name in ("regions.jsonl", "classes.txt"):
            shutil.copy(shared / "synth" / name, work / name)
        for name in ("imgs", "images"):
            (work / name).symlink_to(work / "synth" / "images")
        for name in ("src", "pyproject.toml", "LICENSE", "README.md"):  # read, never written by a block
            (work / name).symlink_to(ROOT / name)
        for name in ("docs", "benchmarks", "tools", "tests"):  # copies: blocks write docs/images/, benchmarks/results/
            shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        PAGE_DIRS[page] = work
        PAGE_NAMESPACES[page] = {"__name__": "__doc_block__"}
    return PAGE_DIRS[page]


PASSED_SHELL: dict[str, str] = {}  # a shell block repeated on another page (the set-up commands) runs once


def run_block(block: Block, doc_env) -> str:
    """Run one block in its page's folder and return its stdout; a failure names the block's file and line."""
    code = block.swapped()
    if block.lang != "python" and code in PASSED_SHELL:
        return PASSED_SHELL[code]
    for n, line in enumerate(code.split("\n")):
        if re.search(r"\bpip install\b", line) and "--dry-run" not in line:
            raise AssertionError(
                f"{block.where}: line {n + 1} installs packages ({line.strip()!r}); swap it to --dry-run in a marker"
            )
    work = page_dir(block.page, doc_env)
    shown = f"{block.where} (as run{' with its swap' if code != block.code else ''}):\n{code}"
    if block.lang == "python":
        out = io.StringIO()
        old = os.getcwd()
        os.chdir(work)
        try:
            with contextlib.redirect_stdout(out):
                exec(compile("\n" * block.line + code, str(block.page), "exec"), PAGE_NAMESPACES[block.page])
        except Exception as exc:
            raise AssertionError(f"{shown}\nraised {type(exc).__name__}: {exc}") from exc
        finally:
            os.chdir(old)
        return out.getvalue()
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", code],
        cwd=work,
        env=doc_env["env"],
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"{shown}\nexited with {proc.returncode}\n--- stdout (end)\n{proc.stdout[-3000:]}\n--- stderr (end)\n{proc.stderr[-3000:]}"
        )
    PASSED_SHELL[code] = proc.stdout
    return proc.stdout


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.where for b in ALL_BLOCKS])
def test_doc_block_runs(block: Block, doc_env):
    if block.not_run:
        pytest.skip(f"{block.where}: not run — {block.not_run}")
    stdout = run_block(block, doc_env)
    if block.output is not None:
        why = output_matches(block.output, stdout)
        assert why is None, f"{block.where}: the output differs from the one the page shows ({why})\n--- got\n{stdout}"


def test_doc_block_census():
    """How many blocks run as written, with a swap, or not at all (printed with -rA / in the CI log)."""
    plain = [b for b in ALL_BLOCKS if not b.marker]
    swapped = [b for b in ALL_BLOCKS if b.marker and not b.not_run]
    not_run = [b for b in ALL_BLOCKS if b.not_run]
    print(f"doc blocks: {len(ALL_BLOCKS)}; as written {len(plain)}, with a stated swap {len(swapped)}, not run {len(not_run)}")
    for b in not_run:
        print(f"  not run: {b.where}: {b.not_run}")
    assert plain and len(ALL_BLOCKS) == len(plain) + len(swapped) + len(not_run)
    for b in ALL_BLOCKS:
        if b.marker and not b.not_run and "run with:" not in b.marker:
            raise AssertionError(f"{b.where}: a doc-test marker must say 'run with: `OLD` → `NEW`' or 'not run: WHY'")


LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page: lower case, punctuation dropped, spaces → hyphens."""
    out = set()
    for line in page.read_text(encoding="utf-8").split("\n"):
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path):
    for n, line in enumerate(page.read_text(encoding="utf-8").split("\n"), 1):
        for target in LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.relative_to(ROOT)}:{n}: link to {target!r}, which does not exist"
            if anchor and dest.suffix == ".md":
                assert anchor in anchors(dest), (
                    f"{page.relative_to(ROOT)}:{n}: link to {target!r}: no such heading in {path or page.name}"
                )


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    serve(sys.argv[2])
