//! The browser page the service serves on its gRPC port: `GET /` returns a single page that classifies an
//! uploaded image by calling `Classify` through gRPC-Web on the same origin (no proxy, no CORS, no external
//! scripts). The files in `src/web/` are compiled into the binary, so the page always matches the server.

use axum::{
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tonic::service::Routes;

const INDEX_HTML: &str = include_str!("web/index.html");
const APP_JS: &str = include_str!("web/app.js");
const STYLE_CSS: &str = include_str!("web/style.css");

/// The page's routes: `/`, `/app.js` and `/style.css`.
pub fn router() -> axum::Router {
    axum::Router::new()
        .route("/", get(index))
        .route("/app.js", get(app_js))
        .route("/style.css", get(style_css))
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// The gRPC services, reachable from browsers through gRPC-Web, plus the page and the `rest` routes, on one
/// HTTP/1 + HTTP/2 port.
///
/// The gRPC-Web layer wraps only the gRPC routes: it answers every plain HTTP/1 request with 400, so wrapping
/// the whole server (`Server::builder().layer(..)`) would hide the page. Keeping tonic's routes as the base
/// keeps its fallback, so a call to an unknown service still answers UNIMPLEMENTED.
pub fn with_grpc_web_and_page(grpc: Routes, rest: axum::Router) -> Routes {
    grpc.into_axum_router()
        .layer(tonic_web::GrpcWebLayer::new())
        .merge(router())
        .merge(rest)
        .into()
}

/// The page's script and style come from this origin, images from the user's own file (blob:/data:), and
/// calls go back to this origin only; no inline script or style, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            // The files are part of the binary: revalidate so a redeployed server is picked up at once.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")),
            // Only our own files run, nothing is framed, and no URL leaks to other sites.
            (header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP)),
            (header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;

    async fn get(path: &str) -> Response {
        let request = Request::get(path).body(Body::empty()).expect("valid request");
        router().oneshot(request).await.expect("infallible")
    }

    #[tokio::test]
    async fn index_is_html_that_loads_the_script_and_style() {
        let response = get("/").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert!(INDEX_HTML.contains(r#"src="app.js""#) && INDEX_HTML.contains(r#"href="style.css""#));
    }

    #[tokio::test]
    async fn every_asset_forbids_framing_inline_script_and_referrers() {
        for path in ["/", "/app.js", "/style.css"] {
            let response = get(path).await;
            let headers = response.headers();
            let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
            assert!(
                csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"),
                "{csp}"
            );
            assert!(!csp.contains("unsafe-inline"), "{csp}");
            assert_eq!(headers[header::REFERRER_POLICY], "no-referrer");
            assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY");
        }
        // An inline script or style attribute would be blocked by that policy and break the page.
        assert!(!INDEX_HTML.contains("<script>") && !INDEX_HTML.contains(" style="));
    }

    #[tokio::test]
    async fn script_and_style_are_served_with_their_types() {
        assert_eq!(
            get("/app.js").await.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        assert_eq!(
            get("/style.css").await.headers()[header::CONTENT_TYPE],
            "text/css; charset=utf-8"
        );
        assert_eq!(get("/nope").await.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_page_calls_the_rpcs_by_their_proto_names() {
        // A renamed proto package or method must break this test, not the page in production.
        assert!(APP_JS.contains("/fashion_mnist.v1.Classifier/Classify"));
        assert!(APP_JS.contains("/fashion_mnist.v1.Classifier/GetModelInfo"));
    }
}
