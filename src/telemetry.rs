//! OpenTelemetry traces over OTLP/gRPC (`tracing`), off unless an endpoint is configured.
//!
//! tokengate's own `tracing` spans are the trace: a `check` span per Check (opened by
//! [`Checker::check_traced`](crate::check::Checker::check_traced) for the front doors, `server`
//! and `http`) with `cache`, `precheck`, `verify` and `review` children
//! (opened by `check` where those steps run). [`layer`] turns them into OpenTelemetry spans
//! (tracing-opentelemetry) and exports them in batches (opentelemetry-otlp, tonic). When
//! tracing is off no layer is installed and the spans, at `debug` level, are disabled at their
//! call sites by the log filter: a Check pays one cached interest check per span.
//!
//! The `check` span continues the proxy's trace: the W3C `traceparent`/`tracestate` or B3
//! (`b3`, `x-b3-*`) headers are read first from the gRPC call's own metadata (Envoy's ext_authz
//! client injects its span there when tracing is on in Envoy), then from the checked request's
//! headers (what the client or an ingress sent). Sampling follows the parent's sampled flag;
//! `tracing.sample_ratio` applies to Checks that arrive without a trace context.

use opentelemetry::propagation::{Extractor, TextMapCompositePropagator, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::check::Outcome;
use crate::config::TracingConfig;
use crate::request::{Header, RequestView};

/// Target of tokengate's trace spans.
pub const SPAN_TARGET: &str = "tokengate::trace";
/// The environment variables that turn tracing on when `tracing.otlp_endpoint` is absent (the
/// OpenTelemetry SDK's standard names; the exporter reads them too).
pub const ENDPOINT_ENV: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Why the OTLP exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("setting up the OTLP trace exporter: {0}")]
pub struct TelemetryError(#[from] opentelemetry_otlp::ExporterBuildError);

/// Keeps the tracer provider; [`Tracing::shutdown`] exports what is still buffered.
#[derive(Debug)]
pub struct Tracing {
    provider: SdkTracerProvider,
}

impl Tracing {
    /// Exports the spans still buffered and stops the exporter. Blocks (up to the exporter's
    /// timeout): call it from a blocking thread inside the runtime, which drives the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "OTLP trace exporter did not shut down cleanly");
        }
    }
}

/// Whether tracing is on: `tracing.otlp_endpoint`, else one of [`ENDPOINT_ENV`] (non-empty).
pub fn enabled(config: &TracingConfig) -> bool {
    config.otlp_endpoint.is_some()
        || ENDPOINT_ENV
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
}

/// The OTLP layer for tokengate's spans, or `None` when tracing is off. Must run inside a tokio
/// runtime (the exporter's gRPC channel lives there). The layer accepts only tokengate's
/// spans (never log events), so it can sit beside the log output's own filter.
pub fn layer<S>(
    config: &TracingConfig,
) -> Result<Option<(impl tracing_subscriber::Layer<S>, Tracing)>, TelemetryError>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    if !enabled(config) {
        return Ok(None);
    }
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if let Some(endpoint) = &config.otlp_endpoint {
        exporter = exporter.with_endpoint(endpoint.clone());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter.build()?)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("tokengate");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_level(false)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            meta.is_span() && meta.target() == SPAN_TARGET
        }));
    Ok(Some((layer, Tracing { provider })))
}

/// Where a trace context may be found: a set of headers.
pub trait Carrier {
    /// The value of header `name` (lower-case), when sent once and valid text.
    fn header(&self, name: &str) -> Option<&str>;
}

impl Carrier for RequestView<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        match RequestView::header(self, name) {
            Header::One(v) => Some(v),
            Header::Absent | Header::Unusable => None,
        }
    }
}

impl Carrier for http::HeaderMap {
    fn header(&self, name: &str) -> Option<&str> {
        let mut values = self.get_all(name).iter();
        match (values.next(), values.next()) {
            (Some(v), None) => v.to_str().ok(),
            _ => None,
        }
    }
}

struct AsExtractor<'a>(&'a dyn Carrier);

impl Extractor for AsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.header(&key.to_ascii_lowercase())
    }

    fn keys(&self) -> Vec<&str> {
        // Only baggage enumerates keys; W3C trace context and B3 ask by name.
        Vec::new()
    }
}

/// W3C trace context, then B3 (single `b3` header or `x-b3-*`).
fn propagator() -> TextMapCompositePropagator {
    TextMapCompositePropagator::new(vec![Box::new(TraceContextPropagator::new()), Box::new(B3)])
}

/// B3 extraction (Envoy's Zipkin tracer): the single `b3` header
/// (`{trace}-{span}[-{sampled}[-{parent}]]`), else `x-b3-traceid`, `x-b3-spanid`,
/// `x-b3-sampled`, `x-b3-flags`. Written here because opentelemetry-zipkin, which has one,
/// is deprecated with the Zipkin exporter. A missing sampling state reads as not sampled, as
/// in that crate; tokengate never injects B3.
#[derive(Debug)]
struct B3;

impl B3 {
    fn span_context(extractor: &dyn Extractor) -> Option<SpanContext> {
        let (trace, span, sampled) = match extractor.get("b3") {
            Some(single) => {
                let mut parts = single.trim().split('-');
                (parts.next()?, parts.next()?, parts.next())
            }
            None => (
                extractor.get("x-b3-traceid")?,
                extractor.get("x-b3-spanid")?,
                match extractor.get("x-b3-flags") {
                    Some("1") => Some("d"),
                    _ => extractor.get("x-b3-sampled"),
                },
            ),
        };
        let hex = |s: &str, lens: &[usize]| {
            (lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())).then_some(())
        };
        hex(trace, &[16, 32])?;
        hex(span, &[16])?;
        let trace = TraceId::from_hex(&format!("{trace:0>32}")).ok()?;
        let span = SpanId::from_hex(span).ok()?;
        let flags = match sampled {
            Some("1" | "d" | "true") => TraceFlags::SAMPLED,
            Some("0" | "false") | None => TraceFlags::default(),
            Some(_) => return None,
        };
        Some(SpanContext::new(
            trace,
            span,
            flags,
            true,
            TraceState::default(),
        ))
    }
}

impl TextMapPropagator for B3 {
    fn inject_context(
        &self,
        _: &opentelemetry::Context,
        _: &mut dyn opentelemetry::propagation::Injector,
    ) {
    }

    fn extract_with_context(
        &self,
        cx: &opentelemetry::Context,
        extractor: &dyn Extractor,
    ) -> opentelemetry::Context {
        match B3::span_context(extractor) {
            Some(sc) if sc.is_valid() => cx.with_remote_span_context(sc),
            _ => cx.clone(),
        }
    }

    fn fields(&self) -> opentelemetry::propagation::text_map_propagator::FieldIter<'_> {
        opentelemetry::propagation::text_map_propagator::FieldIter::new(&[])
    }
}

/// The span of one Check, a child of the first valid trace context among `carriers` (in
/// order). Disabled (and the headers never read) when tracing is off.
pub fn check_span(carriers: &[&dyn Carrier]) -> tracing::Span {
    let span = tracing::debug_span!(
        target: SPAN_TARGET,
        "check",
        otel.kind = "server",
        route = tracing::field::Empty,
        outcome = tracing::field::Empty,
        reason = tracing::field::Empty,
    );
    if span.is_disabled() {
        return span;
    }
    let propagator = propagator();
    let parent = carriers
        .iter()
        .map(|c| propagator.extract(&AsExtractor(*c)))
        .find(|cx| cx.span().span_context().is_valid());
    if let Some(parent) = parent {
        // Fails only when no OpenTelemetry layer is installed (debug logging without tracing).
        let _ = span.set_parent(parent);
    }
    span
}

/// Records a Check's outcome on its span.
pub fn record(span: &tracing::Span, outcome: &Outcome<'_>) {
    if span.is_disabled() {
        return;
    }
    let (route, kind, reason) = crate::audit::describe(outcome);
    span.record("route", route);
    span.record("outcome", kind);
    span.record("reason", reason);
    if matches!(outcome, Outcome::Unavailable { .. }) {
        span.record("otel.status_code", "ERROR");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extracted(headers: &[(&str, &str)]) -> Option<opentelemetry::trace::SpanContext> {
        let map: http::HeaderMap = headers
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect();
        let cx = propagator().extract(&AsExtractor(&map));
        let sc = cx.span().span_context().clone();
        sc.is_valid().then_some(sc)
    }

    #[test]
    fn w3c_and_b3_contexts_are_read() {
        let w3c = extracted(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )])
        .unwrap();
        assert_eq!(
            w3c.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(w3c.is_sampled() && w3c.is_remote());

        let b3 = extracted(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ])
        .unwrap();
        assert_eq!(b3.span_id().to_string(), "e457b5a2e4d86bd1");
        let single =
            extracted(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0")]).unwrap();
        assert!(!single.is_sampled());

        assert!(extracted(&[("traceparent", "garbage")]).is_none());
        assert!(extracted(&[("b3", "80f198ee56343ba8-e457b5a2e4d86bd1-x")]).is_none());
        assert!(extracted(&[("b3", "+0f198ee56343ba8-e457b5a2e4d86bd1")]).is_none());
        let short = extracted(&[("b3", "80f198ee56343ba8-e457b5a2e4d86bd1-d")]).unwrap();
        assert_eq!(
            short.trace_id().to_string(),
            "000000000000000080f198ee56343ba8"
        );
        assert!(short.is_sampled());
        assert!(extracted(&[]).is_none());
    }
}
