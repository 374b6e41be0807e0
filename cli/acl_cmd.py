"""`neurons audit acls`: the Kafka ACLs the contract implies (shared/contracts/acl.py).

``--format kafka-acls`` prints the script kept as deploy/kafka/acls.sh;
``--format json`` the same set as data, one entry per principal.
"""

from __future__ import annotations

import json

import typer

from shared.contracts import acl
from shared.topics import prefix

FORMATS = ("kafka-acls", "json")


def acls(
    output: str = typer.Option("kafka-acls", "--format", help="kafka-acls (a shell script of kafka-acls.sh --add) or json"),
) -> None:
    """Who may write, read and join what on Kafka: derived from the schemas' x-producers and each service's topics."""
    if output not in FORMATS:
        raise typer.BadParameter(f"{output!r}: choose from {', '.join(FORMATS)}", param_hint="--format")
    if output == "json":
        typer.echo(json.dumps(acl.as_json(prefix()), indent=2))
    else:
        typer.echo(acl.render_script(prefix()), nl=False)
