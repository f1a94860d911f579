"""Search the image index from a terminal.

    python main.py                           interactive prompt (:help lists the commands)
    python main.py "a dog in the snow" --top-k 8
    python main.py --image photo.jpg

Every search prints a ranked table (rank, score, path) and saves a grid of the results as a PNG in
RESULTS_FOLDER. The search itself is the engine's (image_retrieval.py), shared with the API.
"""

from __future__ import annotations

import argparse
import logging
import readline
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from config import Settings, add_index_arguments, index_overrides, load_settings
from errors import DatabaseBusy, FilterError, QueryError, StoreError, UnknownImage, fail, run_front_end

if TYPE_CHECKING:
    from image_retrieval import Hit, ImageRetrieval, QueryPart, SearchResult

PROMPT = "search> "
MODES = ("vector", "keyword", "hybrid")
SORTS = ("relevance", "taken", "-taken")
RANKING_SCORE = {"keyword": "keyword", "hybrid": "fused"}  # the score column's name in those modes
HISTORY_FILE_NAME = ".repl_history"
HISTORY_LENGTH = 1000
HELP = """\
  <text>            search by description
  :k N              results per query
  :image PATH       search by an example image
  :more N           more like result N of the last search
  :mode MODE        vector, keyword or hybrid
  :filter EXPR      metadata filter, e.g. :filter tags contains dog and width >= 500 (alone: clear)
  :min SCORE        lowest score shown, -1 to 1 (alone: clear)
  :sort ORDER       relevance, taken (oldest first) or -taken (newest first)
  :open N           the file of result N
  :help             this list
  :quit             leave (Ctrl-D and Ctrl-C too)"""


class CommandError(ValueError):
    """Input at the prompt that cannot be carried out; the message says why."""


@dataclass
class Options:
    """What every search of the session uses; changed by the prompt's commands."""

    top_k: int
    mode: str = "vector"
    filters: str | None = None
    min_score: float | None = None
    sort: str = "relevance"

    def describe(self, mode: str | None = None) -> str:
        """The options in words; `mode` names the mode that actually ranked, when it differs."""
        parts = [f"k={self.top_k}", f"mode={mode or self.mode}"]
        if self.sort != "relevance":
            parts.append(f"sort={self.sort}")
        if self.filters:
            parts.append(f"filter: {self.filters}")
        if self.min_score is not None:
            parts.append(f"min score {self.min_score:g}")
        return ", ".join(parts)


# -- command line ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Search the image index from a terminal: interactive without a query, else one search."
    )
    parser.add_argument("query", nargs="?", help="text to search for once, then exit")
    parser.add_argument("--image", type=Path, help="search once by this example image, then exit")
    parser.add_argument("--top-k", help="results per query (TOP_K)")
    parser.add_argument("--mode", choices=MODES, default="vector", help="how to rank (default: vector)")
    parser.add_argument("--filter", help="metadata filter, e.g. 'tags contains dog and width >= 500'")
    parser.add_argument("--min-score", help="lowest score shown, -1 to 1")
    parser.add_argument(
        "--sort",
        choices=SORTS,
        default="relevance",
        help="order: relevance, taken or -taken (date taken; write --sort=-taken)",
    )
    add_index_arguments(parser)
    parser.add_argument("--results", help="folder for the saved grids (RESULTS_FOLDER)")
    parser.add_argument("--verbose", action="store_true", help="log what the engine does (LOG_LEVEL)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(RESULTS_FOLDER=args.results, **index_overrides(args))


def options_from(args: argparse.Namespace, settings: Settings) -> Options:
    """The session's starting options from the flags; CommandError names a bad one."""
    from filters import parse_filter

    try:
        parse_filter(args.filter)
    except FilterError as error:
        raise CommandError(f"--filter: {error}") from None
    return Options(
        top_k=settings.TOP_K if args.top_k is None else parse_top_k(args.top_k, settings.MAX_TOP_K),
        mode=args.mode,
        filters=args.filter or None,
        min_score=None if args.min_score is None else parse_min_score(args.min_score),
        sort=args.sort,
    )


def parse_top_k(text: str, maximum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CommandError(f"results per query must be a whole number from 1 to {maximum}") from None
    if not 1 <= value <= maximum:
        raise CommandError(f"results per query must be a whole number from 1 to {maximum}")
    return value


def parse_min_score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CommandError("the minimum score must be a number from -1 to 1") from None
    if not -1.0 <= value <= 1.0:
        raise CommandError("the minimum score must be a number from -1 to 1")
    return value


def parse_result_number(text: str, result: SearchResult | None) -> Hit:
    """Result `text` (a rank as printed) of the last search."""
    if result is None:
        raise CommandError("no search yet: search first, then pick a result by its rank")
    ranks = {hit.rank: hit for hit in result.hits}
    try:
        return ranks[int(text)]
    except (ValueError, KeyError):
        if not ranks:
            raise CommandError("the last search found nothing") from None
        raise CommandError(
            f"give the rank of a result of the last search: {min(ranks)} to {max(ranks)}"
        ) from None


# -- searching and showing ------------------------------------------------------------------------


class Session:
    """An open engine, the options in force and the last result; shared by one-shot and prompt use."""

    def __init__(self, engine: ImageRetrieval, options: Options) -> None:
        self.engine = engine
        self.options = options
        self.last: SearchResult | None = None
        self.commands: dict[str, Callable[[str], None]] = {
            "k": self.set_top_k,
            "image": self.search_by_image,
            "more": self.more_like,
            "mode": self.set_mode,
            "filter": self.set_filter,
            "min": self.set_min_score,
            "sort": self.set_sort,
            "open": self.open_result,
            "help": self.show_help,
        }

    def search(self, parts: list[QueryPart], label: str) -> SearchResult:
        """Run one search with the session's options, print its table and save its grid."""
        from image_retrieval import SearchQuery

        query = SearchQuery(
            parts=parts,
            top_k=self.options.top_k,
            min_score=self.options.min_score,
            filters=self.options.filters,
            mode=self.options.mode,
            sort=self.options.sort,
        )
        result = self.engine.search(query)
        self.last = result
        if result.note:
            print(f"note: {result.note}", file=sys.stderr)
        if not result.hits:
            print(f"no results ({self.options.describe(result.mode)})")
            return result
        print(format_table(result.hits, result.mode))
        print(f"grid: {self.save_grid(result, label)}")
        return result

    def save_grid(self, result: SearchResult, label: str) -> Path:
        from result_grid import GridCell, save_grid

        settings = self.engine.settings
        cells = [GridCell(grid_title(hit, result.mode), self.file_of(hit)) for hit in result.hits]
        heading = f"{label}  ({self.options.describe(result.mode)})"
        return save_grid(
            cells,
            heading,
            Path(settings.RESULTS_FOLDER),
            label,
            settings.THUMBNAIL_SIZE,
            settings.MAX_IMAGE_MEGAPIXELS,
        )

    def file_of(self, hit: Hit) -> Path | None:
        try:
            return self.engine.image_path(hit.id)
        except UnknownImage:
            return None

    # -- the prompt's commands --

    def handle(self, line: str) -> bool:
        """Carry out one line typed at the prompt; False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if line in (":quit", ":q", ":exit"):
            return False
        try:
            self.dispatch(line)
        except (CommandError, QueryError, UnknownImage, StoreError) as error:
            print(f"error: {error}", file=sys.stderr)
        except OSError as error:
            print(f"error: cannot save the grid: {error}", file=sys.stderr)
        return True

    def dispatch(self, line: str) -> None:
        from image_retrieval import QueryPart

        if not line.startswith(":"):
            self.search([QueryPart(text=line)], line)
            return
        name, _, argument = line[1:].partition(" ")
        command = self.commands.get(name.lower())
        if command is None:
            raise CommandError(f"unknown command :{name} (:help lists the commands)")
        command(argument.strip())

    def set_top_k(self, argument: str) -> None:
        if argument:
            self.options.top_k = parse_top_k(argument, self.engine.settings.MAX_TOP_K)
        print(f"results per query: {self.options.top_k}")

    def set_mode(self, argument: str) -> None:
        if argument:
            if argument.lower() not in MODES:
                raise CommandError(f"the mode is one of {', '.join(MODES)}")
            self.options.mode = argument.lower()
        print(f"mode: {self.options.mode}")

    def set_sort(self, argument: str) -> None:
        if argument:
            if argument.lower() not in SORTS:
                raise CommandError(f"the order is one of {', '.join(SORTS)}")
            self.options.sort = argument.lower()
        print(f"sort: {self.options.sort}")

    def set_filter(self, argument: str) -> None:
        from filters import parse_filter

        parse_filter(argument)
        self.options.filters = argument or None
        print(f"filter: {argument}" if argument else "filter cleared")

    def set_min_score(self, argument: str) -> None:
        cleared = argument.lower() in ("", "none", "off")
        self.options.min_score = None if cleared else parse_min_score(argument)
        print("minimum score cleared" if cleared else f"minimum score: {self.options.min_score:g}")

    def search_by_image(self, argument: str) -> None:
        from image_retrieval import QueryPart

        if not argument:
            raise CommandError("usage: :image PATH")
        path = Path(argument.strip("'\"")).expanduser()
        if not path.is_file():
            raise CommandError(f"no such image file: {path}")
        self.search([QueryPart(image=path)], f"image {path.name}")

    def more_like(self, argument: str) -> None:
        from image_retrieval import QueryPart

        hit = parse_result_number(argument, self.last)
        self.search([QueryPart(id=hit.id)], f"more like {Path(hit.path).name}")

    def open_result(self, argument: str) -> None:
        hit = parse_result_number(argument, self.last)
        path = self.file_of(hit)
        if path is None:
            raise CommandError(
                f"the file of result {hit.rank} ({hit.path}) is no longer in the dataset folder"
            )
        print(path)

    def show_help(self, _argument: str) -> None:
        print(HELP)
        print(f"now: {self.options.describe()}")


def format_table(hits: list[Hit], mode: str = "vector") -> str:
    """Aligned columns: rank, score, taken and place (when a hit has them), path (and how many
    near-duplicates were folded into a hit).

    In keyword and hybrid mode the score column is what ranks (the BM25 or the fused score), a cosine
    column follows it, and each row ends with why it matched, as the web page shows it.
    """
    rank_width = max(len("rank"), *(len(str(hit.rank)) for hit in hits))
    photo = photo_columns(hits)
    scores = [f"{'score':>7}"] if mode == "vector" else [f"{RANKING_SCORE[mode]:>8}", f"{'cosine':>7}"]
    header = [f"{'rank':>{rank_width}}", *scores, *(f"{name:<{width}}" for name, width, _ in photo), "path"]
    lines = ["  ".join(header)]
    for row, hit in enumerate(hits):
        folded = f"  (+{len(hit.duplicates)} near-duplicates)" if hit.duplicates else ""
        if mode == "vector":
            scores, reasons = [f"{hit.score:>7.4f}"], ""
        else:
            scores, reasons = [f"{ranking_score(hit, mode):>8.5f}", f"{hit.score:>7.4f}"], f"  ({why(hit)})"
        photo_cells = [f"{values[row]:<{width}}" for _, width, values in photo]
        cells = [f"{hit.rank:>{rank_width}}", *scores, *photo_cells]
        lines.append("  ".join([*cells, f"{hit.path}{reasons}{folded}"]))
    return "\n".join(lines)


def photo_columns(hits: list[Hit]) -> list[tuple[str, int, list[str]]]:
    """(name, width, values) of the `taken` and `place` columns that at least one hit has."""
    columns = []
    for name, text in (("taken", taken_text), ("place", place_text)):
        values = [text(hit.metadata) for hit in hits]
        if any(values):
            columns.append((name, max(len(name), *(len(value) for value in values)), values))
    return columns


def taken_text(metadata: dict[str, object]) -> str:
    """The date taken as the camera recorded it, "2019-06-15 14:30" (see photo_metadata.py)."""
    from datetime import UTC, datetime

    taken = metadata.get("taken")
    if not isinstance(taken, (int, float)) or isinstance(taken, bool):
        return ""
    return datetime.fromtimestamp(taken, UTC).strftime("%Y-%m-%d %H:%M")


def place_text(metadata: dict[str, object]) -> str:
    return ", ".join(str(metadata[key]) for key in ("place", "country") if metadata.get(key))


def ranking_score(hit: Hit, mode: str) -> float:
    """The score that put the hit at its rank: cosine, BM25 (keyword) or reciprocal-rank fusion."""
    if mode == "hybrid" and hit.fused_score is not None:
        return hit.fused_score
    if mode == "keyword" and hit.keyword_score is not None:
        return hit.keyword_score
    return hit.score


def why(hit: Hit) -> str:
    """The rank reasons of a keyword or hybrid hit: `vector #3, keyword #1: dog, park`."""

    def rank(value: int | None) -> str:
        return "–" if value is None else f"#{value}"

    terms = f": {', '.join(hit.matched_terms)}" if hit.matched_terms else ""
    return f"vector {rank(hit.vector_rank)}, keyword {rank(hit.keyword_rank)}{terms}"


def grid_title(hit: Hit, mode: str = "vector") -> str:
    digits = 3 if mode == "vector" else 4
    return f"#{hit.rank} {ranking_score(hit, mode):.{digits}f} {Path(hit.path).name}"


# -- the prompt -----------------------------------------------------------------------------------


def run_prompt(session: Session) -> int:
    history = Path(session.engine.settings.RESULTS_FOLDER) / HISTORY_FILE_NAME
    start_line_editing(history, [f":{name}" for name in session.commands] + [":quit"])
    print(f"{session.engine.count()} images indexed. Type a description to search, :help for commands.")
    try:
        while session.handle(read_line()):
            pass
    except (EOFError, KeyboardInterrupt):
        print()
    finally:
        save_history(history)
    return 0


def read_line() -> str:
    return input(PROMPT)


def start_line_editing(history: Path, commands: list[str]) -> None:
    """Readline history from `history`, and tab completion of the commands."""
    readline.set_history_length(HISTORY_LENGTH)
    if history.is_file():
        try:
            readline.read_history_file(history)
        except OSError as error:
            logging.getLogger(__name__).warning("cannot read the history %s: %s", history, error)

    def complete(text: str, state: int) -> str | None:
        matches = [command + " " for command in commands if command.startswith(text)]
        return matches[state] if state < len(matches) else None

    readline.set_completer_delims(" \t\n")
    readline.set_completer(complete)
    readline.parse_and_bind("tab: complete")


def save_history(history: Path) -> None:
    try:
        history.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(history)
    except OSError as error:
        logging.getLogger(__name__).warning("cannot save the history %s: %s", history, error)


# -- opening the index ----------------------------------------------------------------------------


def open_engine(settings: Settings) -> ImageRetrieval:
    """The engine over an existing, non-empty index; StoreError says what to run otherwise."""
    from image_retrieval import ImageRetrieval

    engine = ImageRetrieval(settings, role="repl", create=False)
    if engine.count() == 0:
        engine.close()
        where = (
            f"{settings.CHROMA_HOST}:{settings.CHROMA_PORT}"
            if settings.server_mode
            else settings.CHROMA_DB_PATH
        )
        raise StoreError(
            f"the index at {where} is empty: run `python embed_images.py` to index {settings.DATASET_FOLDER}"
        )
    return engine


def busy_message(busy: DatabaseBusy) -> str:
    url = busy.owner.get("url")
    if busy.owner.get("role") == "api" and url:
        return f"the database is in use by the API server at {url}; search there or stop it"
    return f"{busy}; wait for it to finish or stop it"


def one_shot_parts(args: argparse.Namespace) -> list[QueryPart]:
    from image_retrieval import QueryPart

    parts = [QueryPart(text=args.query)] if args.query is not None else []
    if args.image is not None:
        if not args.image.is_file():
            raise CommandError(f"no such image file: {args.image}")
        parts.append(QueryPart(image=args.image))
    return parts


def one_shot_label(args: argparse.Namespace) -> str:
    words = [args.query] if args.query is not None else []
    if args.image is not None:
        words.append(f"image {args.image.name}")
    return " + ".join(words)


def run_once(session: Session, args: argparse.Namespace) -> int:
    try:
        session.search(one_shot_parts(args), one_shot_label(args))
    except (CommandError, QueryError, UnknownImage) as error:
        return fail(error, 2)
    except OSError as error:
        return fail(f"cannot save the grid: {error}", 1)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_front_end(
        lambda: settings_from(args),
        lambda settings: start(settings, args),
        log_level=None if args.verbose else logging.WARNING,
    )


def start(settings: Settings, args: argparse.Namespace) -> int:
    try:
        options = options_from(args, settings)
    except CommandError as error:
        return fail(error, 2)
    one_shot = args.query is not None or args.image is not None
    try:
        return run(settings, options, args if one_shot else None)
    except KeyboardInterrupt:
        print()
        return 130 if one_shot else 0


def run(settings: Settings, options: Options, one_shot: argparse.Namespace | None) -> int:
    try:
        engine = open_engine(settings)
    except DatabaseBusy as busy:
        return fail(busy_message(busy), 1)
    with engine:
        session = Session(engine, options)
        return run_once(session, one_shot) if one_shot else run_prompt(session)


if __name__ == "__main__":
    sys.exit(main())
