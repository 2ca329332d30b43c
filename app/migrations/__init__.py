"""carecoord's Alembic environment (``env.py``) and revisions (``versions/``).

They ship inside the package so that an installed carecoord (a wheel, the Docker image)
migrates its database with nothing from the source tree: :func:`app.db.run_migrations` points
Alembic at this directory. Developers use the repository's ``alembic.ini`` for ``alembic
revision --autogenerate``; it points here too.
"""
