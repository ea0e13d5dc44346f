"""On PostgreSQL, refuse UPDATE and DELETE on the audit tables (append-only).

Only the archive-and-prune job may delete, inside a transaction that sets ``portcullis.audit_prune``.
TRUNCATE (test-database flushes) is not a row operation and is unaffected.
"""

from __future__ import annotations

from django.db import migrations

TABLES = ("audit_auditevent", "audit_usagerecord", "audit_auditcheckpoint")

FUNCTION = """
CREATE OR REPLACE FUNCTION portcullis_audit_append_only() RETURNS trigger AS $$
BEGIN
  IF TG_OP = 'DELETE' AND current_setting('portcullis.audit_prune', true) = 'on' THEN
    RETURN OLD;
  END IF;
  RAISE EXCEPTION 'audit tables are append-only (%% on %%)', TG_OP, TG_TABLE_NAME;
END;
$$ LANGUAGE plpgsql;
"""


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    schema_editor.execute(FUNCTION)
    for table in TABLES:
        schema_editor.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION portcullis_audit_append_only()"
        )


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table in TABLES:
        schema_editor.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
    schema_editor.execute("DROP FUNCTION IF EXISTS portcullis_audit_append_only()")


class Migration(migrations.Migration):
    dependencies = [("audit", "0003_chain_checkpoints_reports")]
    operations = [migrations.RunPython(forwards, backwards)]
