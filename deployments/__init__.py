"""Ray Serve applications: Socarrat's online front door (`serve run deployments/serve_config.yaml`).

`text_to_image.py` holds the application and its builder, `openai_api.py` the wire format it speaks
(OpenAI's Images API). They call `socarrat.generator.Generator` and carry no sampling code of their own.
"""
