"""Keep docs/RESULTS.md honest: rerun the commands whose printed lines it quotes and compare.

docs/RESULTS.md marks each quoted output with the command that printed it:

    <!-- check: python 01_score_matching.py -->
    ```text
    ...lines copied from that command's output...
    ```

This script runs every such command once (from the repository root, one thread, seed 0 as in the
file) and checks that each quoted line appears in the fresh output: the same words, and every
number within `--rel` (relative) or one unit of its last printed digit, whichever is larger
(residuals below 1e-4, such as a measurement's rounding error, agree with any other). The
toy lessons' numbers depend only on the seed, so on one platform they repeat to the last digit;
the tolerance only absorbs the last digits that another CPU's float rounding can move.

    python tests/check_results.py              # all checked commands (about 8 minutes on 2 cores)
    python tests/check_results.py --only=01    # the commands that mention 01
"""

import argparse
import os
import re
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
BLOCK = re.compile(r"<!-- check: (.+?) -->\s*```text\n(.*?)```", re.S)


def quoted_blocks(path):
    """(command, [quoted lines]) for every checked block of the results file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [
        (cmd.strip(), [li for li in body.splitlines() if li.strip()])
        for cmd, body in BLOCK.findall(text)
    ]


def skeleton(line):
    """The line's words with every number replaced by '#', and its numbers as strings."""
    return NUMBER.sub("#", " ".join(line.split())), NUMBER.findall(line)


def close(expected, actual, rel):
    """A printed number agrees if within rel, or within one unit of its last printed digit."""
    digits = expected.lower().split("e")[0]
    unit = 10.0 ** -len(digits.split(".")[1]) if "." in digits else 1.0
    if "e" in expected.lower():
        unit *= 10.0 ** int(expected.lower().split("e")[1])
    e, a = float(expected), float(actual)
    if abs(e) < 1e-4 and abs(a) < 1e-4:  # a rounding-level residual (e.g. max |Mx - m|): any agrees
        return True
    return abs(e - a) <= max(rel * abs(e), unit * 1.0001)


def line_found(line, output_lines, rel):
    words, numbers = skeleton(line)
    for candidate in output_lines:
        cwords, cnumbers = skeleton(candidate)
        if cwords == words and all(close(e, a, rel) for e, a in zip(numbers, cnumbers)):
            return True
    return False


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=os.path.join(ROOT, "docs", "RESULTS.md"))
    parser.add_argument("--rel", type=float, default=0.02, help="relative tolerance per number")
    parser.add_argument("--only", default="", help="check only commands containing this text")
    args = parser.parse_args()
    blocks = [(c, lines) for c, lines in quoted_blocks(args.results) if args.only in c]
    if not blocks:
        raise SystemExit(f"error: no '<!-- check: ... -->' block in {args.results} matches")
    outputs, failures = {}, 0
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    for command, lines in blocks:
        if command not in outputs:
            start = time.time()
            run = subprocess.run(command.split(), cwd=ROOT, env=env, capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(
                    f"error: `{command}` exited {run.returncode}:\n{run.stderr[-2000:]}"
                )
            outputs[command] = run.stdout.splitlines()
            print(f"ran `{command}` in {time.time() - start:.0f} s", flush=True)
        missing = [li for li in lines if not line_found(li, outputs[command], args.rel)]
        failures += len(missing)
        for li in missing:
            print(f"  NOT REPRODUCED by `{command}`: {li}")
        print(f"{command}: {len(lines) - len(missing)} of {len(lines)} quoted lines reproduced")
    if failures:
        raise SystemExit(f"error: {failures} quoted lines of {args.results} did not reproduce")
    print("every quoted line reproduced")


if __name__ == "__main__":
    main()
