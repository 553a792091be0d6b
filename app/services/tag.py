"""Tags: normalised names, aliases that resolve to a tag, the parent hierarchy."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Project, Tag, TagAlias, TagCategory
from app.services.errors import ConflictError, InvalidInputError
from app.services.import_formats import VocabularyEntry, normalise_tag_name


class TagResolver:
    """Resolves raw tag names of one project to tags, creating unknown tags on demand.

    Holds the project's tags and aliases in memory for the length of an import, so that
    resolving thousands of names costs no queries.
    """

    def __init__(self, session: Session, project: Project) -> None:
        self.session = session
        self.project = project
        self.by_name = {
            t.name: t for t in session.scalars(select(Tag).where(Tag.project_id == project.id))
        }
        aliases = session.execute(
            select(TagAlias.alias, Tag.name)
            .join(Tag, TagAlias.tag_id == Tag.id)
            .where(TagAlias.project_id == project.id)
        )
        self.alias_to_name = {alias: name for alias, name in aliases}
        self.created: list[Tag] = []

    def find(self, raw: str) -> Tag | None:
        """The tag ``raw`` names (directly or by alias), or None (a name no tag could have
        included)."""
        try:
            name = normalise_tag_name(raw)
        except ValueError:
            return None
        return self.by_name.get(self.alias_to_name.get(name, name))

    def ensure(self, raw: str, *, category: TagCategory = TagCategory.GENERAL) -> Tag:
        """The tag ``raw`` names (directly or by alias), created if it is new."""
        name = normalise_tag_name(raw)
        name = self.alias_to_name.get(name, name)
        tag = self.by_name.get(name)
        if tag is None:
            tag = Tag(
                project_id=self.project.id,
                name=name,
                display_name=name.replace("_", " "),
                category=category,
                description="",
                priority=1.0,
            )
            self.session.add(tag)
            self.by_name[name] = tag
            self.created.append(tag)
        return tag

    def add_alias(self, alias_raw: str, tag: Tag) -> None:
        alias = normalise_tag_name(alias_raw)
        if alias in self.by_name and self.by_name[alias] is not tag:
            raise ConflictError(f"alias {alias!r} is already the name of a tag")
        current = self.alias_to_name.get(alias)
        if current is not None and current != tag.name:
            raise ConflictError(f"alias {alias!r} already resolves to {current!r}")
        if current is None:
            self.session.add(TagAlias(project_id=self.project.id, alias=alias, tag=tag))
            self.alias_to_name[alias] = tag.name

    def with_ancestors(self, tag: Tag, *, limit: int | None = None) -> list[Tag]:
        """The tag and every parent above it: a child tag implies its parent. With ``limit``,
        a chain longer than that is refused (``InvalidInputError``) instead of walked."""
        chain, seen = [], set()
        current: Tag | None = tag
        while current is not None and id(current) not in seen:
            chain.append(current)
            if limit is not None and len(chain) > limit:
                raise _too_deep(tag)
            seen.add(id(current))
            current = current.parent
        return chain


def _category(value: str, where: str) -> TagCategory:
    try:
        return TagCategory(value)
    except ValueError:
        names = ", ".join(c.value for c in TagCategory)
        raise InvalidInputError(f"{where}: category {value!r} is not one of {names}") from None


def apply_vocabulary(resolver: TagResolver, entries: list[VocabularyEntry]) -> None:
    """Create or update tags from a vocabulary: display names, categories, parents, aliases,
    exhaustiveness."""
    tags = {}
    for entry in entries:
        tag = resolver.ensure(entry.name)
        tag.display_name = entry.display_name
        tag.category = _category(entry.category, f"vocabulary tag {entry.name!r}")
        tag.description = entry.description or tag.description
        tag.exhaustive = entry.exhaustive
        tags[entry.name] = tag
    for entry in entries:
        tag = tags[entry.name]
        if entry.parent:
            parent = resolver.ensure(entry.parent)
            chain = resolver.with_ancestors(parent, limit=MAX_TAG_DEPTH)
            if parent is tag or tag in chain:
                raise InvalidInputError(
                    f"vocabulary: {entry.name!r} -> {entry.parent!r} is a cycle"
                )
            tag.parent = parent
        for alias in entry.aliases:
            resolver.add_alias(alias, tag)
    _check_depth(tags.values())


# Deeper than any real hierarchy (Danbooru's go five or six deep): a chain of 20,000 parents in
# a 92 kB vocabulary took 316 s to import, every tag walking its ancestors.
MAX_TAG_DEPTH = 32


def _too_deep(tag: Tag) -> InvalidInputError:
    return InvalidInputError(
        f"vocabulary: {tag.name!r} is more than {MAX_TAG_DEPTH} levels deep (itself and the "
        "tags above it); a hierarchy goes at most that deep"
    )


def _check_depth(tags: Iterable[Tag]) -> None:
    """Every tag with its parents makes a chain of at most ``MAX_TAG_DEPTH`` (each tag's depth found
    once, from its parent's)."""
    depth: dict[int, int] = {}
    for tag in tags:
        path: list[Tag] = []
        current: Tag | None = tag
        while current is not None and id(current) not in depth:
            path.append(current)
            if len(path) > MAX_TAG_DEPTH:
                raise _too_deep(tag)
            current = current.parent
        base = depth[id(current)] if current is not None else 0
        for k, t in enumerate(reversed(path), start=1):
            depth[id(t)] = base + k
            if base + k > MAX_TAG_DEPTH:
                raise _too_deep(t)
