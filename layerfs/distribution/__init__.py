"""The OCI distribution API's client side: references, credentials, and pulling and pushing images between a
registry and an OCI image layout directory, every blob checked against its digest on the way."""
