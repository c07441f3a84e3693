"""netvlad search service: a FastAPI app (REST API + web page) over an index folder.

    from service.app import create_app
    from service.settings import Settings
    app = create_app(Settings(index_dir="my-index"))   # or `netvlad serve --index my-index`
"""
