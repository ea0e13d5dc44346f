"""The admin REST API (Django REST framework), calling the same services as the console."""
