"""`neurons chat PROFILE "prompt"`: ask the serving API, as any OpenAI client would, and say what answered."""

from __future__ import annotations

import json
import os

import typer

from shared.settings import Settings


def serving_url(settings: Settings) -> str:
    """The serving API this node runs (its address file), or one line saying how to start it."""
    path = settings.run_dir / "serving-api.json"
    if not path.exists():
        typer.echo("neurons: no serving API on this node; start the platform (`neurons up`) and wait for "
                   "`neurons status` to show serving running", err=True)
        raise typer.Exit(1)
    return json.loads(path.read_text())["url"]


def token_headers() -> dict[str, str]:
    """The bearer token a serving API bound off loopback requires (NEURONS_API_TOKEN), if one is set."""
    token = os.environ.get("NEURONS_API_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def chat(
    profile: str = typer.Argument(..., help="a profile id (`neurons profiles list`) or channel:<name>"),
    prompt: str = typer.Argument(..., help="what to ask"),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="the most tokens to generate"),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="print the answer as it is generated"),
    as_json: bool = typer.Option(False, "--json", help="print the whole response body"),
) -> None:
    """Chat with PROFILE: its adapter answers in its manner (the profile's traits are its system prompt)."""
    import httpx

    settings = Settings.from_env()
    url = serving_url(settings) + "/v1/chat/completions"
    headers = token_headers()
    body = {"model": profile, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "stream": stream and not as_json}
    with httpx.Client(timeout=120.0, headers=headers) as client:
        if not body["stream"]:
            answer = client.post(url, json=body)
            _check(answer)
            data = answer.json()
            typer.echo(json.dumps(data, indent=2) if as_json else data["choices"][0]["message"]["content"])
            if not as_json:
                _served_by(data.get("neurons") or {})
            return
        with client.stream("POST", url, json=body) as answer:
            if answer.status_code >= 400:
                answer.read()
                _check(answer)
            served = {}
            for line in answer.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                served = chunk.get("neurons") or served
                for choice in chunk.get("choices") or ():
                    typer.echo((choice.get("delta") or {}).get("content") or "", nl=False)
            typer.echo("")
            _served_by(served)


def _check(answer) -> None:
    if answer.status_code >= 400:
        try:
            error = answer.json()["error"]
            message = f"{error.get('code')}: {error.get('message')}"
        except (ValueError, KeyError, TypeError):
            message = answer.text[:300]
        typer.echo(f"neurons: {answer.status_code} {message}", err=True)
        raise typer.Exit(1)


def _served_by(served: dict) -> None:
    adapter = served.get("adapter_sha256")
    version = served.get("profile_version")
    typer.echo(f"-- answered by {adapter[:12] if adapter else 'the base model'}"
               + (f", profile version {version}" if version is not None else ""), err=True)
