"""`neurons`: the operator's command line.

Every command reads the same settings as the services (environment variables,
see shared/settings.py). A wrong argument prints one line that says what to do.
"""

from __future__ import annotations

import json
import logging
import sys

import typer
from typer._click import exceptions as cli_errors

from cli import approval_cmds, audit, bench_cmd, broker_cmd, cycle_cmds, data_cmds, demo_cmds, energy_cmd, registry_cmds, train_cmds, validate_cmds
from cli import acl_cmd, chat_cmd
from cli import db_cmd
from shared import processes
from shared.settings import Settings

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="neurons: train, validate, approve and promote LoRA adapters from an event log.")
app.add_typer(broker_cmd.app, name="broker")
app.add_typer(audit.app, name="audit")
app.add_typer(db_cmd.app, name="db")
app.add_typer(energy_cmd.app, name="energy")
app.add_typer(approval_cmds.operator_app, name="operator")
app.add_typer(approval_cmds.approvals_app, name="approvals")
app.add_typer(cycle_cmds.cycle_app, name="cycle")
app.add_typer(cycle_cmds.research_app, name="research")
app.add_typer(data_cmds.data_app, name="data")
cycle_cmds.cycle_app.command("run")(demo_cmds.cycle_run)
app.command("demo")(demo_cmds.demo)
app.command("bench")(bench_cmd.bench)
app.command("chat")(chat_cmd.chat)
app.add_typer(registry_cmds.profiles_app, name="profiles")
app.add_typer(registry_cmds.adapters_app, name="adapters")
audit.app.command("at")(registry_cmds.audit_at)
audit.app.command("acls")(acl_cmd.acls)
validate_app = typer.Typer(no_args_is_help=True, help="Validation soaks: snapshots and re-judging.")
validate_app.command("show")(registry_cmds.validate_show)
validate_app.command("rejudge")(validate_cmds.rejudge)
app.add_typer(validate_app, name="validate")
app.command("train")(train_cmds.train)
app.command("approve")(approval_cmds.approve)
app.command("reject")(approval_cmds.reject)


@app.command()
def up() -> None:
    """Start the embedded broker (unless KAFKA_BOOTSTRAP_SERVERS is set) and the seven services, every
    database first brought to the head schema revision; a service that exits while starting is reported failed."""
    settings = Settings.from_env()
    started = processes.up(settings)
    typer.echo(f"broker {started['broker']}")
    for row in started["databases"]:
        typer.echo(f"database   {row['revision']}  {row['url']}")
    failed = processes.wait_started(settings)
    for name, pid in started["services"].items():
        state = f"failed: {failed[name]}" if name in failed else f"pid {pid}"
        typer.echo(f"{name:<10} {state}  log {processes.log_file(settings, name)}")
    if failed:
        raise typer.Exit(1)


@app.command()
def down() -> None:
    """Stop every service and the embedded broker."""
    stopped = processes.down(Settings.from_env())
    for name, was_running in stopped.items():
        typer.echo(f"{name:<10} {'stopped' if was_running else 'was not running'}")


@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="print JSON")) -> None:
    """The broker's address and, for the broker and each service, pid, state, API and metrics URLs."""
    info = processes.status(Settings.from_env())
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    typer.echo(f"bootstrap  {info['bootstrap_servers'] or '-'}")
    for row in [info["broker"], *info["services"]]:
        url = f"  {row['url']}" if row.get("url") else ""
        url += f"  metrics {row['metrics_url']}" if row.get("metrics_url") else ""
        typer.echo(f"{row['name']:<10} {row['state']:<8} pid {row['pid'] or '-'}{url}")


def fail(message: str) -> None:
    """Stop with one line on stderr and exit status 2."""
    typer.echo(f"neurons: {message}", err=True)
    raise typer.Exit(2)


def main(argv: list[str] | None = None) -> int:
    # aiokafka logs every failed connection attempt; a command says once what went wrong instead
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="neurons", standalone_mode=False)
        if isinstance(code, int) and code:
            return code
    except cli_errors.NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help() if exc.ctx else "run `neurons --help`")
        return 0
    except cli_errors.UsageError as exc:
        hint = f"run `{exc.ctx.command_path} --help`" if exc.ctx else "run `neurons --help`"
        typer.echo(f"neurons: {exc.format_message()} ({hint})", err=True)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("neurons: aborted", err=True)
        return 130
    except cli_errors.ClickException as exc:
        typer.echo(f"neurons: {exc.format_message()}", err=True)
        return exc.exit_code
    except (RuntimeError, ValueError, FileNotFoundError, PermissionError) as exc:
        # aiokafka's errors are RuntimeErrors; one that found no broker says what to do instead
        typer.echo(f"neurons: {no_broker_line() if type(exc).__name__ == 'KafkaConnectionError' else exc}", err=True)
        return 1
    return 0


def no_broker_line() -> str:
    """What to do when no broker answers a command."""
    settings = Settings.from_env()
    if settings.bootstrap_servers:
        return f"no Kafka broker answers at {settings.bootstrap_servers} (KAFKA_BOOTSTRAP_SERVERS)"
    from shared import broker

    address = broker.status(settings).bootstrap_servers or "its address"
    return f"the embedded broker does not answer at {address}: run `neurons broker start` (or `neurons up`)"


if __name__ == "__main__":
    sys.exit(main())
