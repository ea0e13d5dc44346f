"""On PostgreSQL, refuse TRUNCATE on the audit tables too: the row triggers of 0004 never see it, and a log
emptied whole (checkpoints and all) could only be noticed afterwards (``verifyaudit --max-checkpoint-age``).

A session that sets ``portcullis.audit_truncate`` to ``on`` may still truncate: the test suite's connections
do, to empty the database between transactional tests. As with the row triggers, this stops mistakes, not a
role that owns the tables.
"""

from __future__ import annotations

from django.db import migrations

TABLES = ("audit_auditevent", "audit_usagerecord", "audit_auditcheckpoint")

FUNCTION = """
CREATE OR REPLACE FUNCTION portcullis_audit_no_truncate() RETURNS trigger AS $$
BEGIN
  IF current_setting('portcullis.audit_truncate', true) = 'on' THEN
    RETURN NULL;
  END IF;
  RAISE EXCEPTION 'audit tables are append-only (TRUNCATE on %%)', TG_TABLE_NAME;
END;
$$ LANGUAGE plpgsql;
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(FUNCTION)
    for table in TABLES:
        schema_editor.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION portcullis_audit_no_truncate()"
        )


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table in TABLES:
        schema_editor.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
    schema_editor.execute("DROP FUNCTION IF EXISTS portcullis_audit_no_truncate()")


class Migration(migrations.Migration):
    dependencies = [("audit", "0009_anomalyscan")]
    operations = [migrations.RunPython(forwards, backwards)]
