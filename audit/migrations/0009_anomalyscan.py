"""Where anomaly detection has read up to: the high-water marks of usage ids and audit-chain seqs."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("audit", "0008_usage_fewer_indexes"),
    ]

    operations = [
        migrations.CreateModel(
            name="AnomalyScan",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("usage_id", models.BigIntegerField(default=0)),
                ("event_seq", models.BigIntegerField(default=0)),
                ("scanned_at", models.DateTimeField()),
            ],
        ),
    ]
