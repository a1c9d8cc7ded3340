"""The ``dicomcloud`` command line."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from dicomcloud import __version__
from dicomcloud.config import ROLES, Settings, load_settings, mask_url
from dicomcloud.errors import DicomCloudError

app = typer.Typer(
    help="dicomcloud: a DICOM archive (DIMSE + DICOMweb). One process on a NAS, or roles "
    "spread over nodes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect settings.", no_args_is_help=True)
app.add_typer(config_app, name="config")
console = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", "-c", help="Extra TOML settings file, read after config/settings*.toml.")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Data directory (index, queue, storage) [default: ./dicomcloud-data].")]


def _quiet_pydicom() -> None:
    """Our own checks judge the data (and say why); pydicom's value warnings are noise."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


def _setup_logging(level: str) -> None:
    _quiet_pydicom()
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pynetdicom", "hypercorn.access", "aiosqlite", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings(config: Path | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, **overrides)
    except DicomCloudError as exc:
        console.print(f"[red]configuration error:[/red] {exc.message}")
        raise typer.Exit(2) from exc


def _fail(exc: DicomCloudError) -> typer.Exit:
    console.print(f"[red]error:[/red] {exc.message}")
    return typer.Exit(1)


@app.command()
def run(
    roles: Annotated[str | None, typer.Option(
        help=f"Comma-separated roles to run in this process, of {','.join(ROLES)} "
             "[default: the `roles` setting (DICOMCLOUD_ROLES), which is all four].")] = None,
    data_dir: DataDirOpt = None,
    http_port: Annotated[int | None, typer.Option(help="DICOMweb port [default: 8080].")] = None,
    dimse_port: Annotated[int | None, typer.Option(help="DIMSE port [default: 11112].")] = None,
    ae_title: Annotated[str | None, typer.Option(
        help="Our AE title for DIMSE [default: DICOMCLOUD].")] = None,
    config: ConfigOpt = None,
    pid_file: Annotated[Path | None, typer.Option(help="Write the process id here.")] = None,
) -> None:
    """Run the archive: all roles in one process by default, on embedded backends unless
    index_url / queue_url / cache_url / storage_url say otherwise.

    Stops gracefully on SIGTERM or Ctrl-C: no new associations or requests are accepted,
    running ones finish, queued events stay durable for the next start.
    """
    settings = _settings(
        config, roles=roles, data_dir=data_dir, web__port=http_port,
        scp__port=dimse_port, scp__ae_title=ae_title)
    _setup_logging(settings.log_level)
    from dicomcloud.runtime import run_loop, serve

    if pid_file is not None:
        pid_file.write_text(f"{os.getpid()}\n")
    try:
        run_loop(serve(settings))
    except DicomCloudError as exc:
        raise _fail(exc) from exc
    except KeyboardInterrupt:
        pass
    finally:
        if pid_file is not None:
            pid_file.unlink(missing_ok=True)


@app.command()
def migrate(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Create or upgrade the index schema (safe to run again; runs at start too)."""
    settings = _settings(config, data_dir=data_dir)
    _setup_logging("WARNING")

    async def go() -> list[str]:
        from dicomcloud.backends.sqlindex import SqlIndex
        from dicomcloud.backends.sqlschema import migrate as apply

        settings.data_dir.mkdir(parents=True, exist_ok=True)
        async with SqlIndex(settings.resolved_index_url, auto_migrate=False) as index, \
                index.engine.begin() as conn:
            return await apply(conn)

    try:
        applied = asyncio.run(go())
    except DicomCloudError as exc:
        raise _fail(exc) from exc
    if applied:
        console.print(f"applied {len(applied)} migration(s): {', '.join(applied)}")
    else:
        console.print("index schema is up to date")


@app.command("access-log")
def access_log(
    config: ConfigOpt = None, data_dir: DataDirOpt = None,
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's rows.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Rows to show.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Show the newest access-log rows: who read or stored what, over DICOMweb and DIMSE.

    The worker role keeps them in the index (worker.access_log_table; on by default on one
    node). Scaled out, query Doris' dicom_access_log instead.
    """
    import orjson

    settings = _settings(config, data_dir=data_dir)
    _setup_logging("WARNING")

    async def go() -> list[dict[str, Any]]:
        from dicomcloud.backends.sqlindex import SqlIndex

        async with SqlIndex(settings.resolved_index_url) as index:
            return await index.recent_access(tenant, limit)

    try:
        rows = asyncio.run(go())
    except DicomCloudError as exc:
        raise _fail(exc) from exc
    if as_json:
        for row in rows:
            sys.stdout.write(orjson.dumps(row, default=str).decode() + "\n")
        return
    table = Table("time (UTC)", "tenant", "who", "from", "service", "what", "status", "bytes",
                  "ms", box=None)
    for column in table.columns:
        column.no_wrap = True
    for row in reversed(rows):
        who = row["principal"] or row["client_id"] or row["calling_ae"] or "-"
        what = row["sop_uid"] or row["series_uid"] or row["study_uid"] or row["route"]
        table.add_row(str(row["event_time"])[:19], row["tenant_id"], who,
                      row["client_ip"] or "-", row["service"], what, str(row["status"]),
                      str(row["bytes_in"] + row["bytes_out"]), f"{row['duration_ms']:.1f}")
    # a pipe or a file gets whole lines; a terminal its own width
    Console(width=None if sys.stdout.isatty() else 250).print(table)
    if not rows:
        console.print("no access recorded yet (is the worker role running, with "
                      "worker.access_log_table on?)")


def _files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if name.upper() != "DICOMDIR" and not name.startswith("."):
                        yield Path(root) / name
        else:
            yield path


@app.command("import")
def import_(
    paths: Annotated[list[Path], typer.Argument(
        help="DICOM files or folders (searched recursively).", exists=True)],
    tenant: Annotated[str | None, typer.Option(help="Tenant to import into.")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Import DICOM files through the same checks as C-STORE, with a progress bar.

    Files are stored durably and queued for indexing: a running archive indexes them at
    once, otherwise the next `dicomcloud run` does. Refused files are listed with the
    reason; the exit code is 1 if any file was refused.
    """
    settings = _settings(config, data_dir=data_dir)
    _setup_logging("WARNING")
    from dicomcloud.bulkimport import import_files

    files = list(_files(paths))
    with Progress(TextColumn("[bold]importing"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                  console=console, disable=not files) as progress:
        task = progress.add_task("import", total=len(files), rate="")

        def advance(done: int, rate: float) -> None:
            progress.update(task, completed=done, rate=f"{rate:.0f} files/s")

        try:
            report = asyncio.run(import_files(settings, files, tenant, advance))
        except DicomCloudError as exc:
            raise _fail(exc) from exc
    table = Table(title="import summary")
    table.add_column("result")
    table.add_column("files", justify="right")
    table.add_row("accepted", str(report.accepted))
    reasons = Counter(reason for _, reason, _ in report.rejected)
    for reason, count in reasons.most_common():
        table.add_row(f"rejected: {reason}", str(count))
    console.print(table)
    for path, reason, detail in report.rejected[:20]:
        console.print(f"  [yellow]{path}[/yellow]: {reason}: {detail}", markup=True,
                      highlight=False)
    if len(report.rejected) > 20:
        console.print(f"  ... and {len(report.rejected) - 20} more")
    console.print(f"accepted {report.accepted}, rejected {len(report.rejected)} "
                  f"of {len(files)} file(s) in {report.seconds:.1f} s")
    if report.rejected:
        raise typer.Exit(1)


@app.command()
def certs(
    out: Annotated[Path, typer.Option(help="Directory to write the PEM files to.")] = Path(
        "dicomcloud-certs"),
    host: Annotated[list[str] | None, typer.Option(
        help="Host name or IP address the server certificate is for (repeat the option); "
             "[default: localhost and 127.0.0.1].")] = None,
    days: Annotated[int, typer.Option(help="Validity in days.")] = 825,
) -> None:
    """Make a development CA, a server and a client certificate (for testing HTTPS only:
    the CA's private key is written next to them)."""
    from dicomcloud.certs import make_development_certs

    names = host or ["localhost", "127.0.0.1"]
    issued = make_development_certs(out, names, days)
    console.print(f"wrote a development CA and certificates for {', '.join(names)} to {out}/")
    console.print("serve HTTPS with:\n"
                  f"  DICOMCLOUD_WEB__TLS_CERTFILE={issued.server_cert} "
                  f"DICOMCLOUD_WEB__TLS_KEYFILE={issued.server_key} dicomcloud run\n"
                  f"and let clients trust {issued.ca} (curl --cacert {issued.ca} ...)")


@config_app.command("show")
def config_show(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Print the effective settings (after files, environment and options), secrets masked."""
    settings = _settings(config, data_dir=data_dir)
    out = Console()
    for name, value in _flatten(settings):
        if name.endswith("_url"):
            value = mask_url(str(value))
        out.print(f"{name} = {value!r}", highlight=False, markup=False)
    out.print(f"# resolved: index {mask_url(settings.resolved_index_url)}", markup=False)
    out.print(f"# resolved: queue {mask_url(settings.resolved_queue_url)}", markup=False)
    out.print(f"# resolved: cache {mask_url(settings.resolved_cache_url)}", markup=False)
    out.print(f"# resolved: storage {settings.resolved_storage_url}", markup=False)


def _flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    import dataclasses

    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if dataclasses.is_dataclass(value):
            yield from _flatten(value, f"{prefix}{field.name}.")
        else:
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif hasattr(value, "items"):
                value = dict(value)
            yield f"{prefix}{field.name}", value


@app.command()
def version() -> None:
    """Print the version."""
    print(f"dicomcloud {__version__}")
