"""Hot statements on the DBAPI cursor: compiled once per dialect, run without an execution context.

SQLAlchemy's execute path costs 150-300 us of Python per statement on the 2-core development
machine (cache key, execution context, result metadata, and ORM rows on top), while SQLite runs
most of the answer path's statements in 15-40 us: with some twenty statements per answered grid,
the framework around them was most of a request's CPU (measured per thread, issue #21). A
``Prepared`` statement is a Core statement compiled once per dialect, its bind and result
processors looked up once (the types' own: datetimes, enums, booleans and JSON come back as
SQLAlchemy would hand them back); a call binds the values in order, runs the string on the
session's own DBAPI connection, inside the session's transaction (the writer's turn on SQLite,
the commit and the rollback stay the session's; the session's pending changes are flushed first,
as its own execute would), and returns plain tuples.

What it leaves to SQLAlchemy's own path (``Session.execute``, the same statement): an expanding
``IN`` with an empty list (SQLAlchemy renders an empty set there), and ``IN`` lists in an
``executemany``. DBAPI errors are raised as
SQLAlchemy's (``IntegrityError`` and the rest), as callers expect them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from sqlalchemy import exc, inspect, select
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Session, configure_mappers
from sqlalchemy.sql.elements import BindParameter

Processor = Callable[[Any], Any]
Params = Mapping[str, Any] | Sequence[Mapping[str, Any]]  # one set of values, or one per row


class _Compiled:
    """One statement's SQL for one dialect, with what binding and reading rows need."""

    def __init__(self, statement: Any, dialect: Dialect, columns: Sequence[str] | None) -> None:
        compiled = statement.compile(dialect=dialect, column_keys=columns)
        prefetch = [*compiled.insert_prefetch, *compiled.update_prefetch]
        if prefetch:  # defaults the execution context would compute: the caller binds them
            names = ", ".join(c.key for c in prefetch)
            raise ValueError(f"a prepared statement binds every value; it would default {names}")
        self.dialect = dialect
        self.sql: str = compiled.string
        self.positional = bool(dialect.positional)
        binds: dict[str, BindParameter[Any]] = {
            name: bind for bind, name in compiled.bind_names.items()
        }
        # Bind names in the order the string takes them (positional paramstyles), or all of them.
        self.names: list[str] = list(compiled.positiontup or []) if self.positional else list(binds)
        self.keys: dict[str, str] = {name: binds[name].key for name in binds}
        self.fixed: dict[str, Any] = {
            name: bind.effective_value
            for name, bind in binds.items()
            if not bind.required and bind.callable is None
        }
        self.bind_processors: dict[str, Processor] = {}
        for name, bind in binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self.bind_processors[name] = processor
        self.expanding = {name for name, bind in binds.items() if bind.expanding}
        # Per bind in order: the caller's key, whether the statement holds a value, that value
        # and the processor, looked up once (``bound`` runs on every row of an executemany).
        self.plan: list[tuple[str, bool, Any, Processor | None]] = [
            (
                self.keys[name],
                name in self.fixed,
                self.fixed.get(name),
                self.bind_processors.get(name),
            )
            for name in self.names
        ]
        # A SELECT's columns, or what an INSERT, UPDATE or DELETE returns (none without RETURNING).
        returned = getattr(statement, "selected_columns", None)
        if returned is None:
            returned = statement.exported_columns
        self.returned = [column.type.dialect_impl(dialect) for column in returned]
        # Looked up at the first run: some drivers' processors depend on the column's type code.
        self.processing: list[tuple[int, Processor]] | None = None  # (column, its processor)

    def given(self, name: str, params: Mapping[str, Any]) -> Any:
        """The value of bind ``name``: the caller's, or the one written in the statement."""
        key = self.keys[name]
        return params[key] if key in params else self.fixed[name]

    def _value(self, name: str, params: Mapping[str, Any]) -> Any:
        value = self.given(name, params)
        processor = self.bind_processors.get(name)
        return processor(value) if processor is not None else value

    def bound(self, params: Mapping[str, Any]) -> tuple[str, Sequence[Any] | dict[str, Any]]:
        """The SQL string and its parameters for these values (expanding binds spelled out)."""
        if not self.expanding:  # the common case, on every row of an executemany
            values = []
            for key, written, value, processor in self.plan:
                if key in params or not written:
                    value = params[key]
                values.append(value if processor is None else processor(value))
            return self.sql, values if self.positional else dict(
                zip(self.names, values, strict=True)
            )
        sql = self.sql
        if self.positional:
            positional: list[Any] = []
            for name in self.names:
                if name in self.expanding:
                    items = [self._item(name, v) for v in self.given(name, params)]
                    marks = ", ".join([self._mark()] * len(items))
                    sql = sql.replace(f"__[POSTCOMPILE_{name}]", marks, 1)
                    positional.extend(items)
                else:
                    positional.append(self._value(name, params))
            return sql, positional
        named: dict[str, Any] = {}
        for name in self.names:
            if name in self.expanding:
                items = [self._item(name, v) for v in self.given(name, params)]
                keys = [f"{name}__{i}" for i in range(len(items))]
                marks = ", ".join(f"%({k})s" for k in keys)
                sql = sql.replace(f"__[POSTCOMPILE_{name}]", marks)
                named.update(zip(keys, items, strict=True))
            else:
                named[name] = self._value(name, params)
        return sql, named

    def _item(self, name: str, value: Any) -> Any:
        processor = self.bind_processors.get(name)
        if processor is None:
            return value
        return processor(value)

    def _mark(self) -> str:
        return "?" if self.dialect.paramstyle == "qmark" else "%s"

    def rows(self, cursor: Any) -> list[tuple[Any, ...]]:
        """The cursor's rows, each value as the column's type hands it back."""
        raw = cursor.fetchall()
        if self.processing is None:
            codes = [column[1] for column in cursor.description]
            processors = [
                impl.result_processor(self.dialect, code)
                for impl, code in zip(self.returned, codes, strict=True)
            ]
            self.processing = [(i, p) for i, p in enumerate(processors) if p is not None]
        if not raw:
            return []
        if not self.processing:  # the drivers' rows are tuples already
            return raw if type(raw[0]) is tuple else [tuple(r) for r in raw]
        # Column by column, only the columns whose type turns the driver's value into its own.
        columns = [list(c) for c in zip(*raw, strict=True)]
        for i, processor in self.processing:
            columns[i] = [processor(v) for v in columns[i]]
        return list(zip(*columns, strict=True))


class Result:
    """What a prepared statement returned: its rows (tuples) and the rows it changed."""

    __slots__ = ("rowcount", "rows")

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self.rows, self.rowcount = rows, rowcount

    def first(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None

    def scalars(self) -> list[Any]:
        return [row[0] for row in self.rows]


class Prepared:
    """A Core statement run on the DBAPI cursor of a session's connection (module docstring).

    Build it once at import time, like the statement it wraps; ``run`` binds values by the
    statement's ``bindparam`` keys (a list of dicts runs it once per dict: ``executemany``)."""

    def __init__(self, statement: Any, *, columns: Sequence[str] | None = None) -> None:
        """``columns``: the columns an ``INSERT`` without ``values()`` writes (all of them,
        defaults included, are bound by the caller)."""
        self.statement, self.columns = statement, columns
        self._by_dialect: dict[str, _Compiled] = {}

    def _compiled(self, dialect: Dialect) -> _Compiled:
        compiled = self._by_dialect.get(dialect.name)
        if compiled is None:
            compiled = _Compiled(self.statement, dialect, self.columns)
            self._by_dialect[dialect.name] = compiled
        return compiled

    def run(self, session: Session, params: Params | None = None) -> Result:
        if session.autoflush:  # as the session's own execute would: its changes first
            session.flush()
        connection = session.connection()  # the session's transaction (and writer's turn)
        dialect = connection.dialect
        compiled = self._compiled(dialect)
        many = params is not None and not isinstance(params, Mapping)
        single: Mapping[str, Any] = params if isinstance(params, Mapping) else {}
        if (many and compiled.expanding) or any(
            not compiled.given(name, single) for name in compiled.expanding
        ):
            # An empty IN list (SQLAlchemy renders the empty set), or IN lists in an executemany.
            result = session.execute(self.statement, params)
            rows = [tuple(r) for r in result] if getattr(result, "returns_rows", True) else []
            return Result(rows, getattr(result, "rowcount", -1))
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        sql: str = compiled.sql
        values: Any = None
        try:
            if many:
                values = [compiled.bound(p)[1] for p in params]  # type: ignore[arg-type,union-attr]
                cursor.executemany(sql, values)
                return Result([], cursor.rowcount)
            sql, values = compiled.bound(single)
            cursor.execute(sql, values)
            rows = compiled.rows(cursor) if cursor.description else []
            return Result(rows, cursor.rowcount)
        except dialect.loaded_dbapi.Error as error:
            raise _wrapped(sql, values, error, dialect) from error
        finally:
            cursor.close()


def _wrapped(sql: str, values: Any, error: Exception, dialect: Dialect) -> exc.StatementError:
    """A DBAPI error as SQLAlchemy raises it (``IntegrityError`` for a duplicate key...)."""
    return exc.DBAPIError.instance(sql, values, error, dialect.loaded_dbapi.Error, dialect=dialect)


M = TypeVar("M")


class Copies(Generic[M]):
    """A prepared ``SELECT`` of one entity's table, its rows handed back as read-only copies of the
    entity: not in any session (no identity map, no unit of work), their attributes read as a
    loaded entity's. Built without ``__init__`` (the ORM's own loading does the same), a copy costs
    a few microseconds where loading the entity through the session cost some hundred.

    For reading only: a copy changed is not written (the callers write with statements), and a
    copy must not be added to a session."""

    def __init__(self, model: type[M], statement: Any | None = None) -> None:
        mapper = inspect(model)
        table = mapper.local_table
        self.model = model
        self.manager = mapper.class_manager
        self.keys = [mapper.get_property_by_column(column).key for column in table.c]
        self.prepared = Prepared(statement if statement is not None else select(*table.c))
        self.configured = False

    def where(self, *criteria: Any) -> Copies[M]:
        """The same copies, of the rows that meet ``criteria``."""
        return Copies(self.model, self.prepared.statement.where(*criteria))

    def run(self, session: Session, params: Mapping[str, Any] | None = None) -> list[M]:
        return [self.copy(row) for row in self.prepared.run(session, params).rows]

    def with_extras(
        self, session: Session, params: Mapping[str, Any] | None = None
    ) -> list[tuple[M, tuple[Any, ...]]]:
        """Copies, each with the columns its statement selects after the entity's own."""
        n = len(self.keys)
        return [(self.copy(row[:n]), row[n:]) for row in self.prepared.run(session, params).rows]

    def first(self, session: Session, params: Mapping[str, Any] | None = None) -> M | None:
        rows = self.prepared.run(session, params).rows
        return self.copy(rows[0]) if rows else None

    def copy(self, row: Sequence[Any]) -> M:
        if not self.configured:  # the attributes' instrumentation, as the first query would
            configure_mappers()
            self.configured = True
        entity = self.manager.new_instance()
        entity.__dict__.update(zip(self.keys, row, strict=True))
        return entity
