"""Ray Serve applications: Socarrat's online front door (`serve run deployments/serve_config.yaml`).

Each module holds one application and its builder; they call `socarrat.generator.Generator` and
carry no sampling code of their own.
"""
