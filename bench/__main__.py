"""`python -m bench [--gpu] [--only FIGURE] [--quick]`: the same as `neurons bench`."""

import typer

from cli.bench_cmd import bench

if __name__ == "__main__":
    typer.run(bench)
