//! Errors in OpenAI's JSON shape, `{"error": {"message", "type", "param", "code"}}`, with
//! the matching HTTP status, and a JSON body extractor whose every rejection is such an error
//! (axum's own rejections are plain text).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde_json::json;

use engine_core::KvqError;

/// An error response.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `server_error`.
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400: the request is malformed or asks for something invalid.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 about one field.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::bad_request(message).with_param(param)
    }

    /// 404 for a model this server does not serve.
    pub fn unknown_model(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist."),
        )
        .with_param("model")
        .with_code("model_not_found")
    }

    /// 401 for a missing or wrong API key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
            .with_code("invalid_api_key")
    }

    /// 500: the engine failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The `{"error": {...}}` body.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<KvqError> for ApiError {
    /// A refused request is the caller's error (400); a stopped engine is 503; anything else
    /// is the server's (500).
    fn from(e: KvqError) -> Self {
        match e {
            KvqError::InvalidArgument(m) => ApiError::bad_request(m),
            KvqError::EngineStopped => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                KvqError::EngineStopped.to_string(),
            ),
            other => ApiError::internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// A JSON request body; malformed JSON, a missing field or a wrong type is a 400
/// [`ApiError`], an oversized body a 413.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::new(e.status(), "invalid_request_error", e.body_text()))?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| json_error(&e))
    }
}

/// Names the problem: syntax (malformed JSON) or data (a missing field, a wrong type).
fn json_error(e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::bad_request(format!("malformed JSON in the request body: {e}"))
        }
        Category::Data => {
            let text = e.to_string();
            let err = ApiError::bad_request(format!("invalid request body: {text}"));
            // serde names a missing field as "missing field `name`".
            match text
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split('`').next())
            {
                Some(field) => err.with_param(field),
                None => err,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Body {
        model: String,
    }

    fn parse(s: &str) -> ApiError {
        json_error(&serde_json::from_str::<Body>(s).unwrap_err())
    }

    #[test]
    fn syntax_and_data_errors_are_told_apart() {
        let e = parse("{\"model\": ");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.starts_with("malformed JSON"), "{}", e.message);
        let e = parse("{}");
        assert_eq!(e.param.as_deref(), Some("model"));
        assert!(e.message.contains("missing field `model`"), "{}", e.message);
        let e = parse("{\"model\": 3}");
        assert!(e.message.contains("invalid type"), "{}", e.message);
    }

    #[test]
    fn the_body_has_openai_s_shape() {
        let b = ApiError::unknown_model("x").body();
        assert_eq!(b["error"]["code"], "model_not_found");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert_eq!(b["error"]["param"], "model");
        assert!(b["error"]["message"].as_str().unwrap().contains("`x`"));
    }
}
